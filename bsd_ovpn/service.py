"""The service-manager files shipped in the package, and installing them.

bsd_ovpn ships an rc.d script (FreeBSD: ``ovpnctl_enable``, one supervised
instance per config) and systemd units (Linux: ``ovpnctl-server@NAME``,
``ovpnctl-client@NAME``, ``ovpnctl-engine``) as package data, so a pip
install has them too.  The files name the program as
``/usr/local/bin/ovpnctl`` (where pip on Debian and the FreeBSD ports put
it); :func:`install` writes them with the path of the ``ovpnctl`` actually
installed, because a unit whose ExecStart does not exist fails only at boot.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from bsd_ovpn.errors import OvpnError, UnsupportedPlatform, ValidationError

#: The program path written in the shipped files.
DEFAULT_PROGRAM = "/usr/local/bin/ovpnctl"
SYSTEMD_UNITS = ("ovpnctl-engine.service", "ovpnctl-server@.service", "ovpnctl-client@.service")
RC_SCRIPT = "ovpnctl"
SYSTEMD_DIR = "/etc/systemd/system"
RC_DIR = "/usr/local/etc/rc.d"
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./+@-]+$")


class ServiceInstallError(OvpnError):
    """A service file could not be installed; the message says which and why."""


@dataclass(frozen=True)
class ServiceFile:
    """One file to install: its name, text and mode."""

    name: str
    text: str
    mode: int


def data_path(name: str) -> Path:
    """The shipped file ``name`` (works from a checkout and from an installed package)."""
    if name not in (*SYSTEMD_UNITS, RC_SCRIPT):
        raise ValidationError(f"no shipped service file {name!r}")
    return Path(str(resources.files("bsd_ovpn").joinpath("data", name)))


def shipped_text(name: str) -> str:
    path = data_path(name)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ServiceInstallError(f"the package lacks {path} ({exc.strerror}); reinstall "
                                  "bsd_ovpn") from None


def find_program() -> str:
    """The absolute path of the installed ``ovpnctl`` console script."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "ovpnctl" and os.path.isabs(argv0) and os.access(argv0, os.X_OK):
        return argv0
    found = shutil.which("ovpnctl")
    if found is None:
        raise ServiceInstallError("cannot find the ovpnctl program on PATH; give --program PATH")
    return os.path.abspath(found)


def check_program(program: str) -> str:
    if not _SAFE_PATH.match(program):
        raise ValidationError(f"--program must be an absolute path without spaces or quotes: "
                              f"{program!r}")
    return program


def render(name: str, program: str = DEFAULT_PROGRAM) -> str:
    """The shipped file with ``program`` as the ovpnctl path."""
    return shipped_text(name).replace(DEFAULT_PROGRAM, check_program(program))


def files_for(system: str, program: str = DEFAULT_PROGRAM) -> list[ServiceFile]:
    """What to install for ``system`` ("linux" or "freebsd")."""
    if system == "linux":
        return [ServiceFile(n, render(n, program), 0o644) for n in SYSTEMD_UNITS]
    if system == "freebsd":
        return [ServiceFile(RC_SCRIPT, render(RC_SCRIPT, program), 0o555)]
    raise UnsupportedPlatform(f"no service files for {system!r} (linux: systemd, freebsd: rc.d)")


def this_system() -> str:
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform.startswith("freebsd"):
        return "freebsd"
    raise UnsupportedPlatform(f"no service manager support for {sys.platform}")


def default_dest(system: str) -> str:
    return SYSTEMD_DIR if system == "linux" else RC_DIR


@dataclass(frozen=True)
class Installed:
    path: Path
    changed: bool


def install(files: list[ServiceFile], dest: str | os.PathLike[str], *,
            force: bool = False) -> list[Installed]:
    """Write ``files`` into ``dest``; an existing different file needs ``force``.

    Checks every file before writing any, so a refusal leaves nothing half done.
    """
    d = Path(dest)
    if not d.is_dir():
        raise ServiceInstallError(f"{d} is not a directory")
    plan = []
    for f in files:
        target = d / f.name
        if target.is_symlink():
            raise ServiceInstallError(f"{target} is a symbolic link; refusing to write through it")
        try:
            old = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            old = None
        except OSError as exc:
            raise ServiceInstallError(f"cannot read {target}: {exc.strerror}") from None
        if old is not None and old != f.text and not force:
            raise ServiceInstallError(f"{target} exists and differs from the shipped file; "
                                      "use --force to replace it")
        plan.append((f, target, old != f.text))
    done = []
    for f, target, changed in plan:
        if changed:
            tmp = target.with_name(f".{f.name}.ovpnctl-tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, f.mode)
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(f.text)
                os.chmod(tmp, f.mode)
                os.replace(tmp, target)
            except OSError as exc:
                try:
                    tmp.unlink()
                except OSError:
                    pass
                raise ServiceInstallError(f"cannot write {target}: {exc.strerror}") from None
        done.append(Installed(target, changed))
    return done


def systemd_reload() -> str | None:
    """``systemctl daemon-reload``; an error text, or None when it worked or is not there."""
    if shutil.which("systemctl") is None or not os.path.isdir("/run/systemd/system"):
        return None
    res = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True,
                         timeout=60, check=False)
    return None if res.returncode == 0 else (res.stderr or res.stdout).strip()
