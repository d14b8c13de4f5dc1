"""KMS, both ends: the shapes odyn's KMS proxy and the local KMS (`enclaver kms serve`) share.

Pure modules, staged into odyn's static binary too, so they import neither boto3, botocore nor moto:

- `cms`: `CiphertextForRecipient`, the CMS EnvelopedData KMS answers a `Recipient` with — built
  exactly as KMS does (`build_enveloped`) and opened strictly (`open_enveloped`); asn1crypto and
  cryptography only;
- `wire`: AWS JSON 1.1 as KMS speaks it (the target header, the content type, the error body, the
  actions that take a `Recipient` and the field each answers in); standard library only;
- `credentials`: the IMDSv2 credentials client with botocore's refresh rules (standard library
  only), direct or through the egress proxy.

The adapters of the local KMS (`server`, `keystore`, `actions`, `sigv4`) and the local IMDS (`imds`)
live beside them and may use botocore; this module imports nothing, so importing the package loads
neither.
"""
