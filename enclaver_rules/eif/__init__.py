"""Enclave Image Format: cpio ramdisks, the EIF file, its measurements (PCRs) and signature.

Pure and streaming: every writer takes a sink, hashes as it writes, and never holds an image in
memory. The byte layouts are nitro-cli's (see ../shared/reference/eif.md), so PCRs match.
"""
