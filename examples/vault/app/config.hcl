# Vault in an enclave. Storage: Consul on the parent instance, reached as `host` through the egress
# proxy. Unseal: AWS KMS through odyn's attesting KMS proxy, so only an enclave with this image's
# measurements (the key policy `enclaver trust` writes) can unseal. Peers: the VPC, port 8201.
disable_mlock = true   # enclave memory is never swapped out: there is nothing for mlock to protect
ui            = false

listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  # TLS is Vault's own. A certificate and key baked into the image would be readable by anyone who
  # can pull the image, so give them at start from a secret the enclave unwraps, then set
  # tls_cert_file and tls_key_file; this example leaves TLS to that step.
  tls_disable     = true
}

storage "consul" {
  address = "host:8500"
  path    = "vault/"
}

seal "awskms" {
  kms_key_id = "alias/vault-unseal"
  endpoint   = "http://127.0.0.1:9999"   # the manifest's kms_proxy.listen_port
}
