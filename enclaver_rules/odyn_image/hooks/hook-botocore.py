"""odyn's hook for botocore, replacing pyinstaller-hooks-contrib's (user hooks take priority).

odyn imports two modules of botocore, `botocore.auth` (SigV4Auth) and `botocore.awsrequest`
(AWSRequest), to sign its KMS proxy's requests. The contributed hook collects every data file of
botocore (its service models and endpoint rules, ~28 MB unpacked), none of which signing reads:
this one collects nothing, so the binary carries only the Python modules those imports reach.
"""

datas: list[tuple[str, str]] = []
hiddenimports: list[str] = []
