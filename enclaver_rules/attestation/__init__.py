"""Attestation documents of AWS Nitro Enclaves: the document model, COSE_Sign1, the AWS root, PCRs.

Pure (no file, network or clock access; time comes in as a parameter). One implementation, shared by
the verifier (`enclaver attestation verify`), the simulated NSM and odyn (and, for COSE_Sign1 and
strict CBOR, EIF signatures):

- `document`: `AttestationDocument`, its exact wire encoding and its syntactic checks;
- `cose`: COSE_Sign1, the one implementation (ES256/ES384/ES512) — sign, verify, and for attestation
  documents (ES384) build and decode the envelope; EIF signature sections (`eif.sign`) use it too;
- `chain`: issue an AWS-shaped certificate chain in memory (simulators and tests);
- `roots`: the bundled AWS Nitro Enclaves Root-G1, pinned by fingerprint;
- `pcrs`: PCR arithmetic and measurements files;
- `verify`: the whole procedure, as a `Report` of named checks;
- `nsm_messages`: the NSM API's request and response messages (odyn's client, the simulated NSM);
- `cbor_strict`: the one CBOR reader of hostile bytes (documents, NSM messages, EIF signature sections),
  standard library only;
- `errors`: `AttestationError`, whose `code` names the check that failed.

This module imports nothing: odyn, a small binary without `cryptography`, imports modules of this
package that need no cryptography, so importing the package must not pull it in.
"""
