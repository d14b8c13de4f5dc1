# OpenBao in an enclave: the configuration every node shares, measured with the image (PCR0).
# vault_start.py writes the rest at start to a tmpfs, /dev/shm/openbao/node.hcl: the node's name and
# addresses from its settings, raft's retry_join, and the seal "static" stanza holding the key that
# KMS released to this enclave only. bao reads both files (`-config` twice).
ui           = false
log_level    = "warn"             # errors and warnings; vault_start.py says what it did itself
cluster_name = "enclaver-vault"

listener "tcp" {
  address         = "127.0.0.1:8200"   # the API: ingress 8200 relays here
  cluster_address = "127.0.0.1:8201"   # raft and request forwarding, bao's own mTLS: ingress 8201 relays here, byte for byte
  # TLS for the API is left out of this example: a certificate's key baked into the image is readable by
  # anyone who can pull the image, so give it at start like the seal key (a KMS ciphertext this enclave
  # alone can open), write it next to node.hcl and set tls_cert_file and tls_key_file.
  tls_disable     = true
}
