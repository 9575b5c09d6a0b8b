"""The Kafka jar cache: ``pipeline/kafka/pom.xml`` resolved once with Maven.

The pom pins one ``org.apache.kafka:kafka_2.13`` version plus a logging backend; Maven's
dependency plugin copies the runtime jars into ``<home>/kafka/libs``. A marker holding the
pom's sha256 makes every later start offline (no ``mvn`` call at all). Also finds Java.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import KafkaUnavailableError

log = logging.getLogger(__name__)

KAFKA_DIR = Path(__file__).with_name("kafka")
POM_PATH = KAFKA_DIR / "pom.xml"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies"
JARS_MARKER = ".fedex-pom.sha256"
#: Lines of Maven's output quoted in an error.
OUTPUT_TAIL_LINES = 30


def kafka_version(pom_text: str) -> str:
    """The Kafka version pinned in the pom (``<kafka.version>``)."""
    match = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom_text)
    return match.group(1) if match else "unknown"


def pom_digest(pom_bytes: bytes) -> str:
    return hashlib.sha256(pom_bytes).hexdigest()


def find_java(java: str | None = None) -> str:
    """``java`` as given, else ``$JAVA_HOME/bin/java``, else ``java`` on PATH."""
    if java:
        return java
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise KafkaUnavailableError(
            "Java is not installed (no `java` on PATH and no $JAVA_HOME): the local Kafka broker "
            "needs a JRE 17+, e.g. `apt-get install openjdk-17-jre-headless`. Or point "
            "FEDEX_KAFKA_BOOTSTRAP at an existing cluster."
        )
    return found


def jars_are_cached(libs_dir: Path, pom: Path = POM_PATH) -> bool:
    marker = libs_dir / JARS_MARKER
    try:
        return marker.read_text().strip() == pom_digest(pom.read_bytes())
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_jars(
    libs_dir: Path, *, pom: Path = POM_PATH, mvn: str | None = None, timeout: float = 900
) -> Path:
    """Resolve the pom's runtime dependencies into ``libs_dir`` unless already there. Blocking.

    Safe against concurrent callers (a file lock) and interrupted downloads (fetch into a
    temporary sibling, rename when complete, the marker is written last).
    """
    libs_dir = libs_dir.resolve()
    if jars_are_cached(libs_dir, pom):
        return libs_dir
    with _file_lock(libs_dir.with_name(f".{libs_dir.name}.lock")):
        if jars_are_cached(libs_dir, pom):
            return libs_dir
        mvn_path = mvn or shutil.which("mvn")
        if mvn_path is None or not Path(mvn_path).exists():
            raise KafkaUnavailableError(
                f"Kafka jars are not in {libs_dir} and Maven (`mvn`) is not installed to fetch "
                "them: `apt-get install maven` (one download of ~42 MB, cached afterwards), or "
                "set FEDEX_KAFKA_BOOTSTRAP to an existing cluster."
            )
        log.info("fetching Kafka %s jars into %s (once)", kafka_version(pom.read_text()), libs_dir)
        started = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{libs_dir.name}.", dir=libs_dir.parent))
        try:
            # mvn may write next to the pom (target/); the installed package can be read-only.
            shutil.copy(pom, staging / "pom.xml")
            out_dir = staging / "libs"
            cmd = [
                mvn_path,
                "-q",
                "-B",
                "-f",
                str(staging / "pom.xml"),
                DEPENDENCY_PLUGIN,
                f"-DoutputDirectory={out_dir}",
                "-DincludeScope=runtime",
            ]
            try:
                result = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout, check=False
                )
            except subprocess.TimeoutExpired as exc:
                raise KafkaUnavailableError(
                    f"`mvn` did not finish fetching the Kafka jars within {timeout:.0f} s; "
                    "check network access to Maven Central (or a mirror in ~/.m2/settings.xml)."
                ) from exc
            jars = list(out_dir.glob("*.jar")) if out_dir.is_dir() else []
            if result.returncode != 0 or not jars:
                output = "\n".join(
                    (result.stdout + result.stderr).splitlines()[-OUTPUT_TAIL_LINES:]
                )
                raise KafkaUnavailableError(
                    f"fetching the Kafka jars with Maven failed (exit {result.returncode}); "
                    "Maven Central (or your mirror) must be reachable once.\n"
                    f"command: {' '.join(cmd)}\n--- mvn output ---\n{output}"
                )
            (out_dir / JARS_MARKER).write_text(pom_digest(pom.read_bytes()) + "\n")
            if libs_dir.exists():
                shutil.rmtree(libs_dir)
            out_dir.rename(libs_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("fetched %d jars in %.1f s", len(jars), time.monotonic() - started)
    return libs_dir


async def ensure_jars(libs_dir: Path, *, pom: Path = POM_PATH, mvn: str | None = None) -> Path:
    """Async :func:`fetch_jars`: returns at once when the cache matches the pom."""
    if jars_are_cached(libs_dir, pom):
        return libs_dir
    return await asyncio.to_thread(fetch_jars, libs_dir, pom=pom, mvn=mvn)
