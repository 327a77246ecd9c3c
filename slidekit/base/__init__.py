"""What every stage uses: the exception hierarchy (``errors``), atomic writes and rerun identities
(``io``), output ownership (``outputs``) and folder locks (``locks``), the CPU budget and memory
(``resources``), stage timing (``timing``), torch devices (``devices``) and ``torch.distributed``
(``distributed``), where the real data is (``datapaths``), lazy re-exports (``lazy``), the version.

Imports: the standard library and third-party packages only, never another slidekit package.
``devices`` and ``distributed`` load torch; the rest does not.
"""
from slidekit.base.io import atomic_path, config_digest, file_identity, write_text_atomic
from slidekit.base.version import __version__

__all__ = ["atomic_path", "config_digest", "file_identity", "write_text_atomic", "__version__"]
