"""The mode of the files capaserve writes atomically (bundles, registry blobs and manifests).

They are written to a `mkstemp` file (0600) and renamed or linked into place, so the temp
file's mode would become theirs. They get what `open()` gives any new file instead, 0666
less the umask (0644 under the usual 022), as the models beside them have: a bundle is no
secret (the server hands it to whoever may call the API), and a registry folder may be read
by several users or nodes. Who may read them is the folder's to say (`chmod 700`), or the
umask's.
"""

from __future__ import annotations

import os


def umask() -> int:
    """The process's umask, read without changing it (Linux), else set back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()
