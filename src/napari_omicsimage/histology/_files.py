"""The one place the histology code reaches the project's file-writing and checkpoint APIs.

Until ``outputs.py`` (output safety) and ``checkpoint.write_payload`` land in
main, minimal stand-ins with the same signatures live here; once they are
there this module only re-exports them.
"""

from __future__ import annotations

try:  # pragma: no cover - whichever exists
    from ..outputs import check_output, write_output_file
except ImportError:  # pragma: no cover - stand-in until main has outputs.py
    import os
    import tempfile
    from pathlib import Path

    from ..errors import OmicsInputError

    def check_output(out, *, kind="file", inputs=(), overwrite=False):
        out = Path(out)
        resolved = out.resolve()
        for item in inputs:
            item = Path(item).resolve()
            if resolved == item or item.is_relative_to(resolved) or resolved.is_relative_to(item):
                raise OmicsInputError(f"{out} is (or holds) an input of this command; choose another --out.")
        if out.is_dir():
            raise OmicsInputError(f"{out} is a folder; give a file name.")
        if out.exists() and not overwrite:
            raise OmicsInputError(f"{out} already exists; choose another --out or pass --overwrite.")
        if not os.access(out.parent if out.parent.exists() else Path.cwd(), os.W_OK):
            raise OmicsInputError(f"cannot write to {out.parent}; choose a writable place.")
        return out

    def write_output_file(out, fill, *, overwrite=False):
        out = check_output(out, kind="file", overwrite=overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
        os.close(handle)
        try:
            fill(Path(tmp))
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out

try:  # pragma: no cover - whichever exists
    from ..checkpoint import read_payload, write_payload
except ImportError:  # pragma: no cover - stand-in until main has the generic checkpoint core
    import hashlib
    import io
    import json
    import pickle

    from ..errors import CheckpointError

    def _digest(payload) -> str:
        import torch

        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return hashlib.sha256(buffer.getvalue()).hexdigest()

    def write_payload(payload, path, *, format, overwrite=False):
        import torch

        body = {"format": format, "payload": payload}
        body["sha256"] = _digest(body["payload"])
        return write_output_file(path, lambda tmp: torch.save(body, tmp), overwrite=overwrite)

    def read_payload(path, *, format):
        import torch

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such model file; check the path.")
        try:
            body = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
            raise CheckpointError(f"{path} is not a readable omicsimage model file ({exc}).") from exc
        if not isinstance(body, dict) or body.get("format") != format:
            raise CheckpointError(f"{path} is not a {format} file.")
        if _digest(body["payload"]) != body.get("sha256"):
            raise CheckpointError(f"{path} is corrupted (its content does not match its digest).")
        return body["payload"]

    del json

__all__ = ["check_output", "read_payload", "write_output_file", "write_payload"]
