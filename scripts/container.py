#!/usr/bin/env python3
"""The hotline PBX as a container (docker/asterisk/): engine set-up, pinned base image, compose.

  scripts/container.py setup            install podman, podman-compose and runc if missing
  scripts/container.py base             import the sandbox's Debian root filesystem as the base image
  scripts/container.py build            build the PBX image from docker/asterisk/compose.yaml
  scripts/container.py up --site DIR    start the PBX container with the site files in DIR
  scripts/container.py down             stop it and delete its volumes

No public image registry is reachable from the development machines, only Debian's packages:
so the engine is Debian's podman (rootful, host network), and the base image is made locally
from the root filesystem the sandbox already debootstraps (docker/asterisk/sandbox.py), which
holds Asterisk 22. Its tag is the date of the unstable archive it came from; see the Dockerfile.
These machines lack CAP_SYS_RESOURCE and run cgroups in hybrid mode, so podman gets a
containers.conf of its own (CONTAINERS_CONF): runc (crun refuses hybrid cgroups) and open-file
and process limits within this process's hard limits. Standard library only; run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("PBX_BRIDGE_STATE", REPO / ".state")).resolve()
COMPOSE_FILE = REPO / "docker" / "asterisk" / "compose.yaml"
SANDBOX = REPO / "docker" / "asterisk" / "sandbox.py"
BASE_REPOSITORY = "localhost/pbx-bridge-base"
PROJECT = "pbx-bridge-container"
PACKAGES = {"podman": "podman", "runc": "runc"}  # command: Debian package
# Debian 12's podman-compose 1.0.3 adds the project's network to a host-network container, which
# podman refuses ("cannot set multiple networks without bridge network mode"); 1.0.6, from PyPI
# in a virtualenv of its own, does not.
COMPOSE_VERSION = "1.0.6"
COMPOSE_VENV = STATE / "container" / "compose-venv"
PODMAN_COMPOSE = COMPOSE_VENV / "bin" / "podman-compose"
# Never copied into the image: the sandbox's instances (with their secrets), apt's caches.
IMPORT_EXCLUDES = ("./srv/pbx-bridge-sandbox", "./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*_*")


def say(message: str) -> None:
    print(f"container: {message}", flush=True)


def setup() -> None:
    """Install the engine from Debian's packages and podman-compose from PyPI, if missing."""
    missing = [package for command, package in PACKAGES.items() if shutil.which(command) is None]
    if missing:
        say(f"installing {', '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", *missing]
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            subprocess.run(install, env=env, check=True, stdout=subprocess.DEVNULL)
    installed = subprocess.run([str(PODMAN_COMPOSE), "version"], capture_output=True, text=True) \
        if PODMAN_COMPOSE.exists() else None
    if installed is None or f"podman-compose version {COMPOSE_VERSION}" not in installed.stdout:
        say(f"installing podman-compose {COMPOSE_VERSION} in {COMPOSE_VENV}")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(COMPOSE_VENV)], check=True)
        subprocess.run([str(COMPOSE_VENV / "bin" / "pip"), "install", "-q", f"podman-compose=={COMPOSE_VERSION}"],
                       check=True)


def containers_conf() -> Path:
    """podman's configuration for this machine (see the module docstring), written under .state/."""
    nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], 16384)
    path = STATE / "container" / "containers.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# Written by scripts/container.py.
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
""")
    return path


def engine_env(site: Path | None = None, base: str | None = None) -> dict[str, str]:
    """The environment for podman and podman-compose."""
    env = {**os.environ, "CONTAINERS_CONF": str(containers_conf()),
           "BUILDAH_FORMAT": "docker"}  # docker format keeps the Dockerfile's HEALTHCHECK
    if site is not None:
        env["PBX_SITE"] = str(site)
    if base is not None:
        env["PBX_BRIDGE_BASE"] = base
    return env


def rootfs() -> Path:
    """The sandbox's cached root filesystem, built if absent (sandbox.py build)."""
    subprocess.run([sys.executable, str(SANDBOX), "build"], check=True, stdout=subprocess.DEVNULL)
    spec = importlib.util.spec_from_file_location("pbx_sandbox", SANDBOX)
    assert spec is not None and spec.loader is not None
    sandbox = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sandbox)
    return Path(sandbox.rootfs_path())


def archive_date(root: Path) -> datetime:
    """When the unstable archive the root filesystem was debootstrapped from was published."""
    for release in sorted((root / "var" / "lib" / "apt" / "lists").glob("*_dists_sid_InRelease")):
        for line in release.read_text(errors="replace").splitlines():
            if line.startswith("Date:"):
                return parsedate_to_datetime(line.removeprefix("Date:").strip())
    raise SystemExit(f"container: error: no sid InRelease under {root}/var/lib/apt/lists: cannot date the base")


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name], env=engine_env()).returncode == 0


def base() -> str:
    """The pinned base image (imported once from the sandbox's root filesystem); its name."""
    root = rootfs()
    stamp = archive_date(root).strftime("%Y%m%dT%H%M%SZ")
    name = f"{BASE_REPOSITORY}:sid-{stamp}"
    if image_exists(name):
        return name
    say(f"importing {root} as {name}")
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner",
                            *(f"--exclude={pattern}" for pattern in IMPORT_EXCLUDES), "-c", "."],
                           stdout=subprocess.PIPE)
    subprocess.run(["podman", "import", "--change", 'CMD ["/bin/bash"]',
                    "--change", f"LABEL org.debian.archive=unstable org.debian.archive.date={stamp}",
                    "--message", f"debootstrap of Debian unstable as published {stamp}", "-", name],
                   stdin=tar.stdout, env=engine_env(), check=True, stdout=subprocess.DEVNULL)
    if tar.wait() != 0:
        raise SystemExit(f"container: error: tar of {root} failed (exit {tar.returncode})")
    return name


def compose(*args: str, site: Path | None = None, base_image: str | None = None,
            project: str = PROJECT, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """podman-compose on docker/asterisk/compose.yaml (project `project`)."""
    command = [str(PODMAN_COMPOSE), "-f", str(COMPOSE_FILE), "-p", project, *args]
    return subprocess.run(command, env=engine_env(site, base_image), check=True, text=True,
                          capture_output=capture)


def build(base_image: str) -> None:
    compose("build", base_image=base_image, site=REPO / "docker" / "asterisk" / "site.example")


def container_name(project: str = PROJECT) -> str:
    """The running PBX container of compose project `project` (fails if there is none)."""
    names = subprocess.run(["podman", "ps", "--filter", f"label=io.podman.compose.project={project}",
                            "--format", "{{.Names}}"], env=engine_env(), capture_output=True, text=True,
                           check=True).stdout.split()
    if len(names) != 1:
        raise RuntimeError(f"{len(names)} running containers in compose project {project}: {names}")
    return names[0]


def cli(command: str, project: str = PROJECT, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """An Asterisk CLI command inside the running PBX container."""
    return subprocess.run(["podman", "exec", container_name(project), "asterisk", "-rx", command],
                          env=engine_env(), capture_output=True, text=True, timeout=timeout)


def up(site: Path, project: str = PROJECT) -> None:
    """Start the PBX with the site files in `site` and wait until Asterisk has fully booted."""
    setup()
    base_image = base()
    compose("up", "-d", "--build", site=site, base_image=base_image, project=project)
    name = container_name(project)  # podman-compose exits 0 even when podman run failed
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            if cli("core waitfullybooted", project).returncode == 0:
                return
        time.sleep(0.5)
    logs = subprocess.run(["podman", "logs", name], env=engine_env(), capture_output=True, text=True)
    raise RuntimeError(f"the PBX container did not boot within 60 s; its log:\n{logs.stdout}{logs.stderr}")


def down(project: str = PROJECT) -> None:
    """Stop and remove the container and its volumes (never the images)."""
    if not PODMAN_COMPOSE.exists():
        return  # nothing was ever started from this checkout
    placeholder = REPO / "docker" / "asterisk" / "site.example"
    subprocess.run([str(PODMAN_COMPOSE), "-f", str(COMPOSE_FILE), "-p", project, "down", "-v"],
                   env=engine_env(placeholder, "unused"), check=False, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("setup", "base", "build", "down"):
        sub.add_parser(command)
    start = sub.add_parser("up")
    start.add_argument("--site", type=Path, required=True, help="directory with the site files (see site.example)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("container: error: needs root (rootful podman)")
    if args.command == "setup":
        setup()
    elif args.command == "base":
        print(base())
    elif args.command == "build":
        build(base())
    elif args.command == "up":
        up(args.site.resolve())
    elif args.command == "down":
        down()


if __name__ == "__main__":
    main()
