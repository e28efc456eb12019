"""Supply chain: `make audit` (cargo-deny, offline, against the RustSec snapshot)
and `--locked` on every cargo invocation in the Makefiles and CI.

The audit must really fail on a known advisory: a copy of the snapshot gets one
more advisory, against the libc version in Cargo.lock, and the same script
(tests/delivery/audit.sh) with the same deny.toml must then fail naming it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from support import REPO, require_executable

AUDIT = REPO / "tests" / "delivery" / "audit.sh"
CARGO_HOW = "cargo install --locked cargo-deny (.ci/run does this)"


def locked_version(crate: str) -> str:
    lock = (REPO / "Cargo.lock").read_text()
    m = re.search(rf'\[\[package\]\]\nname = "{crate}"\nversion = "([^"]+)"', lock)
    assert m, crate
    return m.group(1)


def snapshot() -> Path:
    for candidate in (REPO / ".." / "shared" / "advisory-db", REPO / ".." / ".." / "shared" / "advisory-db",
                      Path("/work/shared/advisory-db")):
        if (candidate / "crates").is_dir():
            return candidate.resolve()
    pytest.fail("no RustSec advisory-db snapshot (see tests/delivery/audit.sh for where it is looked for)", pytrace=False)


def audit(tmp_path: Path, db: Path, *checks: str) -> subprocess.CompletedProcess:
    config = tmp_path / "deny.toml"
    # The same policy, with the database under tmp_path (never the shared one in target/).
    policy = (REPO / "deny.toml").read_text()
    assert 'db-path = "target/advisory-dbs"' in policy
    config.write_text(policy.replace('db-path = "target/advisory-dbs"', f'db-path = "{tmp_path / "dbs"}"'))
    env = {**os.environ, "ECHO_ADVISORY_DB": str(db), "DENY_CONFIG": str(config), "CARGO_TERM_COLOR": "never"}
    return subprocess.run([str(AUDIT), *checks], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def test_audit_passes_on_the_snapshot(tmp_path):
    require_executable("cargo-deny", CARGO_HOW)
    result = audit(tmp_path, snapshot())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "advisories ok, bans ok, licenses ok, sources ok" in result.stdout + result.stderr


def test_a_known_advisory_fails_the_audit(tmp_path):
    require_executable("cargo-deny", CARGO_HOW)
    db = tmp_path / "advisory-db"
    shutil.copytree(snapshot(), db, ignore=shutil.ignore_patterns(".git"))
    (db / "SNAPSHOT").write_text((db / "SNAPSHOT").read_text() + "plus RUSTSEC-2099-0001 (test)\n")
    version = locked_version("libc")
    (db / "crates" / "libc" ).mkdir(exist_ok=True)
    (db / "crates" / "libc" / "RUSTSEC-2099-0001.md").write_text(f'''```toml
[advisory]
id = "RUSTSEC-2099-0001"
package = "libc"
date = "2026-08-20"
url = "https://example.com/advisory"
categories = ["memory-corruption"]

[versions]
patched = ["> {version}"]
```

# Test advisory against the locked libc {version}

Injected by tests/delivery/test_supply_chain.py to prove the audit fails.
''')
    result = audit(tmp_path, db, "advisories")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "RUSTSEC-2099-0001" in out, out[-3000:]


def test_audit_fails_clearly_without_the_snapshot(tmp_path):
    env = {**os.environ, "ECHO_ADVISORY_DB": str(tmp_path / "nowhere")}
    result = subprocess.run([str(AUDIT)], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert result.returncode != 0
    assert "advisory-db" in result.stderr


# Subcommands that resolve or build the dependency graph (fmt and clean do not).
RESOLVING = {"build", "run", "test", "nextest", "clippy", "check", "bench", "doc", "install", "fetch", "deny", "metadata"}


def cargo_invocations():
    """(file, line number, line) of every cargo call that resolves dependencies."""
    files = [*REPO.glob("*.mk"), REPO / "Makefile", REPO / ".ci" / "run", AUDIT, REPO / "Dockerfile"]
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "--version" in code:
                continue
            for m in re.finditer(r"(?:\$\(CARGO\)|\bcargo)\s+([a-z-]+)", code):
                if m.group(1) in RESOLVING:
                    yield path.name, n, line.strip()


def test_every_cargo_invocation_is_locked():
    found = list(cargo_invocations())
    assert len(found) >= 6, found
    unlocked = [(f, n, line) for f, n, line in found if "--locked" not in line]
    assert unlocked == []
