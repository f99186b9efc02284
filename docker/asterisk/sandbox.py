#!/usr/bin/env python3
"""Real-PBX sandbox: two Asterisk 22 instances ("pbx" and "world") in a Debian chroot.

pbx is the system under test, configured from the repository's dialplan/ plus the
sandbox site files in pbx-site/. world plays the carrier, outside callers, the agents'
phones and the duty mobile (world/). Both run on loopback addresses of this machine.

Commands (run as root):
  build                 build (or reuse) the cached Debian unstable root filesystem
  start --state DIR     render both instances' configuration, start them, wait for boot
  stop --state DIR      stop both instances
  clean --state DIR     stop both instances and delete their files inside the root filesystem
  env --state DIR       print the sandbox settings (ports, AMI users, secrets) as JSON
  cli --state DIR NAME COMMAND   run an Asterisk CLI command on one instance

Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUITE = "sid"
PACKAGES = ("asterisk", "asterisk-modules", "asterisk-config")
CACHE_ROOT = Path(os.environ.get("PBX_SANDBOX_CACHE", "/var/cache/pbx-bridge"))
INSTANCES_DIR = "/srv/pbx-bridge-sandbox"  # inside the chroot; one folder per state directory
INSTANCES = ("pbx", "world")

DEFAULTS: dict[str, object] = {
    "pbx_ip": "127.0.10.1",
    "world_carrier_ip": "127.0.10.2",
    "world_phones_ip": "127.0.10.3",
    "sip_port": 5060,
    "pbx_ami_port": 15038,
    "world_ami_port": 15039,
    "pbx_ami_user": "pbx-bridge",
    "hotline_numbers": ["4008001234", "4008005678"],
    "other_number": "02584001234",
    "trunk": "carrier",
    "phones": ["agent101", "agent102", "agent103", "reception"],
    "duty_mobile": "13900139000",
    "duty_holder": "值班员小王",
    "probe_caller": "02566660000",
    "pbx_rtp": [30000, 30999],
    "world_rtp": [31000, 31999],
}


def fail(message: str) -> None:
    """Print one clear error and exit non-zero."""
    print(f"sandbox: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def say(message: str) -> None:
    print(f"sandbox: {message}", flush=True)


def rootfs_path() -> Path:
    """The cached root filesystem, keyed by suite and package list."""
    key = hashlib.sha256(f"{SUITE}|{','.join(sorted(PACKAGES))}|v1".encode()).hexdigest()[:12]
    return CACHE_ROOT / f"rootfs-{key}"


def require_root() -> None:
    if os.geteuid() != 0:
        fail("the sandbox needs root (debootstrap and chroot); run it as root or with sudo")


def ensure_debootstrap() -> None:
    if shutil.which("debootstrap"):
        return
    if not shutil.which("apt-get"):
        fail("debootstrap is missing and apt-get is not available to install it")
    say("installing debootstrap with apt-get")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "debootstrap"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def build() -> Path:
    """Build the root filesystem once; later calls reuse the cached copy."""
    require_root()
    root = rootfs_path()
    marker = root / ".pbx-bridge-complete"
    if marker.exists():
        say(f"reusing cached root filesystem {root}")
        return root
    ensure_debootstrap()
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    partial = root.with_name(root.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    say(f"building Debian {SUITE} with {', '.join(PACKAGES)} in {root} (about a minute)")
    started = time.monotonic()
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(partial)]
    log = CACHE_ROOT / "debootstrap.log"
    with log.open("w") as out:
        result = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        fail(f"debootstrap failed (exit {result.returncode}); see {log}")
    (partial / ".pbx-bridge-complete").write_text(" ".join(cmd) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    version = subprocess.run(["chroot", str(root), "asterisk", "-V"], capture_output=True, text=True)
    say(f"built in {time.monotonic() - started:.0f} s: {version.stdout.strip()}")
    return root


def load_settings(state: Path) -> dict[str, object]:
    """Sandbox settings for this state directory; secrets are generated once and kept there."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "sandbox.json"
    settings: dict[str, object] = dict(DEFAULTS)
    if path.exists():
        settings.update(json.loads(path.read_text()))
    for key in ("pbx_ami_secret", "pbx_admin_secret", "world_admin_secret", "phone_secret"):
        settings.setdefault(key, secrets.token_hex(16))
    path.write_text(json.dumps(settings, indent=2) + "\n")
    path.chmod(0o600)
    return settings


def instance_root(state: Path) -> str:
    """Where this state directory's instances live inside the chroot (several checkouts can share it)."""
    return f"{INSTANCES_DIR}/{hashlib.sha256(str(state).encode()).hexdigest()[:12]}"


def render(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z_]+@", template)
    if left:
        fail(f"template placeholder(s) without a value: {', '.join(sorted(set(left)))}")
    return template


def refuse_placeholder_secrets(name: str, text: str) -> None:
    """A configuration copied from site.example must not keep its CHANGE_ME passwords."""
    if "CHANGE_ME" in text:
        fail(f"{name} still holds a CHANGE_ME placeholder password: set a real secret")


def substitutions(name: str, s: dict[str, object], pg: dict[str, str], root: str) -> dict[str, str]:
    port = int(str(s["sip_port"]))
    rtp = s["pbx_rtp"] if name == "pbx" else s["world_rtp"]
    assert isinstance(rtp, list)
    numbers = s["hotline_numbers"]
    assert isinstance(numbers, list)
    return {
        "NAME": name,
        "DIR": f"{root}/{name}",
        "RTP_START": str(rtp[0]),
        "RTP_END": str(rtp[1]),
        "PBX_IP": str(s["pbx_ip"]),
        "PBX_SIP": f"{s['pbx_ip']}:{port}",
        "WORLD_CARRIER_IP": str(s["world_carrier_ip"]),
        "WORLD_CARRIER_SIP": f"{s['world_carrier_ip']}:{port}",
        "WORLD_PHONES_SIP": f"{s['world_phones_ip']}:{port}",
        "PBX_AMI_PORT": str(s["pbx_ami_port"]),
        "WORLD_AMI_PORT": str(s["world_ami_port"]),
        "PBX_AMI_USER": str(s["pbx_ami_user"]),
        "PBX_AMI_SECRET": str(s["pbx_ami_secret"]),
        "PBX_ADMIN_SECRET": str(s["pbx_admin_secret"]),
        "WORLD_ADMIN_SECRET": str(s["world_admin_secret"]),
        "PHONE_SECRET": str(s["phone_secret"]),
        "HOTLINE_DID_LINES": "\n".join(f"exten => {n},1,Goto(hotline,${{EXTEN}},1)" for n in numbers),
        "PG_HOST": pg["host"],
        "PG_PORT": pg["port"],
        "PG_DB": pg["db"],
        "PG_USER": pg["user"],
        "PG_PASSWORD": pg["password"],
    }


def install_config(root: Path, name: str, values: dict[str, str], extra: Path | None = None) -> Path:
    """Write one instance's configuration directory inside the chroot."""
    base = root / values["DIR"].lstrip("/")
    etc = base / "etc"
    shutil.rmtree(etc, ignore_errors=True)
    for sub in ("etc", "db", "log", "run", "spool", "cache"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    sources = [HERE / "common"]
    sources += [REPO / "dialplan", HERE / "pbx-site"] if name == "pbx" else [HERE / "world"]
    if name == "pbx" and extra is not None:
        sources.append(extra)  # e.g. extensions_generated.conf from `pbx-bridge dialplan`
    for source in sources:
        for path in sorted(source.iterdir()):
            if path.suffix == ".md" or not path.is_file():
                continue
            target = etc / path.name.removesuffix(".in")
            text = path.read_text()
            if path.name.endswith(".in"):
                text = render(text, values)
            refuse_placeholder_secrets(path.name, text)
            target.write_text(text)
            target.chmod(0o600)
    return base


def isolate_name_service(root: Path) -> None:
    """Keep Asterisk's own-address lookups inside the chroot and instant.

    For every call Asterisk resolves this host's name and A.ROOT-SERVERS.NET to find its
    RTP address. With the host's resolv.conf copied in, each lookup waits for a resolver
    the sandbox cannot reach (5 s timeouts that pace call setup). The chroot gets its own
    hosts file and a resolver on loopback, which refuses at once.
    """
    hostname = socket.gethostname()
    (root / "etc" / "hosts").write_text(f"127.0.0.1 localhost {hostname}\n::1 localhost ip6-localhost\n")
    (root / "etc" / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")


def pidfile(state: Path, name: str) -> Path:
    return state / f"{name}.pid"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def cli(root: Path, state: Path, name: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    conf = f"{instance_root(state)}/{name}/etc/asterisk.conf"
    return subprocess.run(["chroot", str(root), "asterisk", "-C", conf, "-rx", command],
                          capture_output=True, text=True, timeout=timeout)


def stop_instance(root: Path, state: Path, name: str) -> None:
    path = pidfile(state, name)
    if not path.exists():
        return
    pid = int(path.read_text().strip() or 0)
    if pid and alive(pid):
        with contextlib.suppress(subprocess.TimeoutExpired):
            cli(root, state, name, "core stop now", timeout=10)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not alive(pid):
                break
            os.kill(pid, sig)
            time.sleep(1)
        say(f"stopped {name} (pid {pid})")
    path.unlink(missing_ok=True)


def check_ports_free(settings: dict[str, object]) -> None:
    """Fail clearly if another sandbox (or anything else) holds our AMI or SIP ports."""
    tcp = [("127.0.0.1", int(str(settings[k]))) for k in ("pbx_ami_port", "world_ami_port")]
    sip_port = int(str(settings["sip_port"]))
    udp = [(str(settings[k]), sip_port) for k in ("pbx_ip", "world_carrier_ip", "world_phones_ip")]
    for kind, addresses in ((socket.SOCK_STREAM, tcp), (socket.SOCK_DGRAM, udp)):
        for address in addresses:
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(address)
                except OSError:
                    fail(f"{address[0]}:{address[1]} is in use: is another sandbox running? "
                         "(`make down` in that checkout, or `asterisk -rx 'core stop now'` for it)")


def start(state: Path, pg: dict[str, str], extra: Path | None = None) -> None:
    """Stop anything this state directory started, render configuration, start, wait."""
    root = build()
    settings = load_settings(state)
    for name in INSTANCES:
        stop_instance(root, state, name)
    check_ports_free(settings)
    isolate_name_service(root)
    for name in INSTANCES:
        base = install_config(root, name, substitutions(name, settings, pg, instance_root(state)), extra)
        log = (state / f"{name}.console.log").open("ab")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PGCLIENTENCODING": "UTF8", "TZ": "UTC"}
        process = subprocess.Popen(
            ["chroot", str(root), "asterisk", "-C", f"{instance_root(state)}/{name}/etc/asterisk.conf", "-f", "-n"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        pidfile(state, name).write_text(f"{process.pid}\n")
        say(f"started {name} (pid {process.pid}); logs: {state}/{name}.console.log, {base}/log/")
    for name in INSTANCES:
        deadline = time.monotonic() + 60
        while True:
            try:
                result = cli(root, state, name, "core waitfullybooted", timeout=30)
                if result.returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                fail(f"{name} did not finish booting within 60 s; see {state}/{name}.console.log")
            time.sleep(0.2)
    wait_for_phones(root, state)
    say(f"pbx AMI 127.0.0.1:{settings['pbx_ami_port']}, world AMI 127.0.0.1:{settings['world_ami_port']}; ready")


REGISTERED_PHONES = ("agent101", "agent102", "agent103")  # world's reg-agent10x


def wait_for_phones(root: Path, state: Path) -> None:
    """The agents' phones register at the pbx just after boot: wait until every one has a contact
    and world's registration of it (restarted with it, so fresh) is acknowledged. The contacts
    alone are not enough: the pbx restores its contacts of the last run from its AstDB at boot,
    and dialling them failed ("Could not create dialog ... Is endpoint registered") until the
    phones had registered again."""
    deadline = time.monotonic() + 30
    while True:
        listing = cli(root, state, "pbx", "pjsip show contacts", timeout=10).stdout
        registrations = cli(root, state, "world", "pjsip show registrations", timeout=10).stdout
        missing = [p for p in REGISTERED_PHONES if f" {p}/sip:{p}@" not in listing
                   or re.search(rf"reg-{p}/\S+\s+\S+\s+Registered\b", registrations) is None]
        if not missing:
            return
        if time.monotonic() > deadline:
            fail(f"phones {missing} did not register within 30 s; see {state}/world.console.log")
        time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build")
    for command in ("start", "stop", "clean", "env", "cli"):
        p = sub.add_parser(command)
        p.add_argument("--state", type=Path, required=True, help="state directory (pid files, secrets, logs)")
        if command == "start":
            p.add_argument("--pg-host", default="127.0.0.1")
            p.add_argument("--pg-port", default="5432")
            p.add_argument("--pg-db", default="pbx_bridge")
            # scripts/devenv.py creates this login in the INSERT-only role pbx_cel_writer
            p.add_argument("--pg-user", default="pbx_cel_app")
            p.add_argument("--pg-password", default="")
            p.add_argument("--extra", type=Path, help="more configuration files for pbx (generated ones)")
        if command == "cli":
            p.add_argument("instance", choices=INSTANCES)
            p.add_argument("cli_command")
    args = parser.parse_args()
    if args.command == "build":
        build()
    elif args.command == "start":
        pg = {"host": args.pg_host, "port": args.pg_port, "db": args.pg_db,
              "user": args.pg_user, "password": args.pg_password}
        start(args.state.resolve(), pg, args.extra.resolve() if args.extra else None)
    elif args.command in ("stop", "clean"):
        require_root()
        state = args.state.resolve()
        for name in INSTANCES:
            stop_instance(rootfs_path(), state, name)
        if args.command == "clean":
            shutil.rmtree(rootfs_path() / instance_root(state).lstrip("/"), ignore_errors=True)
    elif args.command == "env":
        settings = load_settings(args.state.resolve())
        settings["rootfs"] = str(rootfs_path())
        print(json.dumps(settings, indent=2))
    elif args.command == "cli":
        result = cli(rootfs_path(), args.state.resolve(), args.instance, args.cli_command)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        raise SystemExit(result.returncode)


if __name__ == "__main__":
    main()
