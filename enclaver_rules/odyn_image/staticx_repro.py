"""Run staticx with a reproducible archive. Executed by the *build venv's* Python, never imported.

staticx tars the loader and libraries it bundles with each file's mtime, owner and group as found
in its temporary copies, so two builds differ (checked: same input, two digests). Every tar member
gets SOURCE_DATE_EPOCH and root:root here; everything else staticx does is already deterministic
(the same input twice, and from two directories, gives the same bytes).
"""

import os
import sys
import tarfile

EPOCH = int(os.environ["SOURCE_DATE_EPOCH"])
_addfile = tarfile.TarFile.addfile


def addfile(self, tarinfo, fileobj=None):  # type: ignore[no-untyped-def]
    tarinfo.mtime = EPOCH
    tarinfo.uid = tarinfo.gid = 0
    tarinfo.uname = tarinfo.gname = ""
    return _addfile(self, tarinfo, fileobj)


tarfile.TarFile.addfile = addfile  # type: ignore[method-assign]

from staticx.__main__ import main  # type: ignore[import-not-found]  # noqa: E402

sys.exit(main())
