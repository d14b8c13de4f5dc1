"""KMS: the pure CMS and wire formats (shared by odyn's KMS proxy and the local KMS), the local KMS and IMDS, and the credentials client."""
