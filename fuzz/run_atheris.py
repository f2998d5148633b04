#!/usr/bin/env python3
"""Coverage-guided long runs of one target from ``fuzz/targets.py`` with atheris.

Usage (from the checkout root)::

    nice -n 19 python3 fuzz/run_atheris.py TARGET [-max_total_time=600] [libFuzzer flags...]
    python3 fuzz/run_atheris.py TARGET CRASH_FILE          # reproduce one input
    python3 fuzz/run_atheris.py --list

Without a directory argument the run reads and grows ``fuzz/corpus/TARGET``
(new inputs are written there; minimise afterwards with ``fuzz/minimize.sh``).
Crashes go to ``fuzz/artifacts/``.  ``fuzz/dict/TARGET.dict`` (directive
names, message keywords, PEM markers), when present, is passed as ``-dict``.

Memory bound: before fuzzing, the address space is capped with RLIMIT_AS
(``BSD_OVPN_FUZZ_AS_MB``, default 1536 MiB above what the interpreter has
mapped), so an allocation driven by a lying length field raises MemoryError
inside the target -- an exception that is not the module's documented error,
hence a reported crash -- instead of swapping the machine; libFuzzer's
``-rss_limit_mb`` (512 by default here) catches slow growth across inputs.
stdin is /dev/null so a config ``config /dev/stdin`` cannot block a run.
"""
from __future__ import annotations

import os
import resource
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _vm_size_mb() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 512


def main() -> None:
    import logging

    import atheris  # only the long runs need it; CI uses the pytest pass

    # Parsers log warnings for odd input (unknown options, ...); a long run
    # would drown in them.  Set here, not in targets.py: importing the targets
    # from the test suite must not change logging for other tests.
    logging.getLogger("bsd_ovpn").setLevel(logging.CRITICAL)

    with atheris.instrument_imports(include=["bsd_ovpn"]):
        import targets  # noqa: F401  (imports the bsd_ovpn modules under instrumentation)
        import bsd_ovpn.config, bsd_ovpn.nv  # noqa: E401,F401
        import bsd_ovpn.engine.commands, bsd_ovpn.engine.dataplane  # noqa: E401,F401
        import bsd_ovpn.proto.datachannel, bsd_ovpn.proto.keyfile  # noqa: E401,F401
        import bsd_ovpn.proto.keymethod, bsd_ovpn.proto.packet, bsd_ovpn.proto.push  # noqa
        import bsd_ovpn.proto.server, bsd_ovpn.proto.session, bsd_ovpn.proto.wrap  # noqa

    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "--list":
        print("\n".join(targets.TARGETS))
        return
    # libFuzzer re-runs argv[0] with only its own flags for -merge (and -fork):
    # the target name travels to those children in the environment.
    if sys.argv[1].startswith("-") and os.environ.get("BSD_OVPN_FUZZ_TARGET"):
        sys.argv.insert(1, os.environ["BSD_OVPN_FUZZ_TARGET"])
    name = sys.argv[1]
    os.environ["BSD_OVPN_FUZZ_TARGET"] = name
    if name not in targets.TARGETS:
        sys.exit(f"unknown target {name!r}; one of: {', '.join(targets.TARGETS)}")
    fn = targets.TARGETS[name]
    if name == "server_endpoint":
        targets._server_tls()            # build the PKI before the memory cap

    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    cap = (_vm_size_mb() + int(os.environ.get("BSD_OVPN_FUZZ_AS_MB", "1536"))) << 20
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:      # a -merge child inherits its parent's cap
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    args = [a for a in sys.argv[2:]]
    if not any(not a.startswith("-") for a in args):
        corpus = os.path.join(ROOT, "fuzz", "corpus", name)
        os.makedirs(corpus, exist_ok=True)
        args.append(corpus)
    if not any(a.startswith("-rss_limit_mb") for a in args):
        args.insert(0, "-rss_limit_mb=512")
    if not any(a.startswith("-artifact_prefix") for a in args):
        art = os.path.join(ROOT, "fuzz", "artifacts", "")
        os.makedirs(art, exist_ok=True)
        args.insert(0, f"-artifact_prefix={art}{name}-")
    dict_path = os.path.join(ROOT, "fuzz", "dict", f"{name}.dict")
    if os.path.exists(dict_path) and not any(a.startswith("-dict") for a in args):
        args.insert(0, f"-dict={dict_path}")
    if not any(a.startswith("-max_len") for a in args):
        args.insert(0, "-max_len=4096")
    atheris.Setup([sys.argv[0]] + args, fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
