"""A deeply nested input is a Python error, never a segfault, in a process that talks to a chain.

web3 imports py_ecc, which sets the recursion limit to 100000; at that limit json.loads of ~100k nested lists
overflows the C stack (SIGSEGV) before RecursionError. `medtwin.chain` puts a safe limit back. Each case runs
in its own interpreter: a regression kills that process, not the test run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_chain_process_raises_recursion_error_on_deeply_nested_json() -> None:
    done = run(
        "import sys, json, threading, medtwin.chain, web3\n"
        "assert sys.getrecursionlimit() <= 1024 * 12, sys.getrecursionlimit()\n"
        "def parse():\n"
        "    try:\n"
        "        json.loads('[' * 99_000 + ']' * 99_000)\n"
        "    except RecursionError:\n"
        "        print('RecursionError')\n"
        "thread = threading.Thread(target=parse); thread.start(); thread.join()  # a server's worker thread\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "RecursionError", (done.returncode, done.stderr[-500:])


def test_an_absurdly_nested_checkpoint_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "round-00001.json"
    path.write_text('{"checkpoint": ' + "[" * 99_000 + "]" * 99_000 + ', "checksum": "x"}', encoding="utf-8")
    done = run(
        "import medtwin.chain\n"
        "from medtwin.server.checkpoint import CheckpointError, load_checkpoint\n"
        "try:\n"
        f"    load_checkpoint({str(path)!r})\n"
        "except CheckpointError as error:\n"
        "    print('CheckpointError', 'cannot be read' in str(error))\n"
    )
    assert done.returncode == 0 and done.stdout.strip() == "CheckpointError True", (done.returncode, done.stderr[-500:])


def test_a_claim_nested_past_the_recursion_limit_is_a_malformed_claim() -> None:
    """Under the default limit (1000) a 4 KB claim can nest 2040 deep: refused by name, like any bad claim."""
    done = run(
        "from medtwin.core.protocol import claim_from_site_record\n"
        "from medtwin.core.identity import SignatureError\n"
        "try:\n"
        "    claim_from_site_record({'claim': '[' * 2040 + ']' * 2040})\n"
        "except SignatureError as error:\n"
        "    print(str(error)[:60])\n"
    )
    assert done.returncode == 0 and "not JSON (RecursionError" in done.stdout, (done.stdout, done.stderr[-300:])


def test_the_admins_files_nested_absurdly_deep_are_refused_by_name(tmp_path: Path) -> None:
    """Federation manifest, signed chain record, key envelope: a nested file is a clear error, not a traceback."""
    nested = "[" * 20_000 + "]" * 20_000
    path = tmp_path / "nested.json"
    path.write_text(nested, encoding="utf-8")
    done = run(
        "import medtwin.chain\n"
        "from medtwin.core.identity.manifest import FederationManifest\n"
        "from medtwin.core.identity.chain_record import load_chain_record\n"
        "from medtwin.core.identity.steward import _read_envelope\n"
        "from medtwin.core.identity.errors import KitError, SignatureError, EnvelopeError\n"
        f"path = {str(path)!r}\n"
        "for name, call, error in (('manifest', lambda: FederationManifest.from_json(open(path).read(), source=path), KitError),\n"
        "                          ('chain record', lambda: load_chain_record(path, None), SignatureError),\n"
        "                          ('envelope', lambda: _read_envelope(path), EnvelopeError)):\n"
        "    try:\n"
        "        call()\n"
        "    except error:\n"
        "        print(name, 'refused')\n"
    )
    assert done.stdout.split("\n")[:3] == ["manifest refused", "chain record refused", "envelope refused"], (done.stdout, done.stderr[-400:])
