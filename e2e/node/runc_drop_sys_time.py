#!/usr/bin/env python3
"""Test-only OCI runtime wrapper of the e2e real node (containerd's runc `BinaryName`).

The node's containerd and kubelet run without CAP_SYS_TIME in their bounding set (the clock rule:
nothing in the tests may be able to set this machine's clock). A pod that adds SYS_TIME, like the
agent DaemonSet, then cannot start: runc fails with "unable to apply caps: operation not
permitted". Rather than change the production pod spec, this wrapper removes CAP_SYS_TIME from
every capability set of the OCI spec runc is about to use (a container's config.json on
`create`/`run`, the process file on `exec`), logs each removal, and execs runc unchanged.
So the agent container runs its real spec with SYS_TIME absent from CapEff, which the e2e tests
check. Never part of a real deployment.

Usage: runc_drop_sys_time.py LOG RUNC [runc arguments...]
"""

import datetime
import json
import os
import sys

CAP = "CAP_SYS_TIME"
SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")


def value_after(args, flag):
    """The value of `--flag V` or `--flag=V` in args, else None."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def strip(path, process_key):
    """Removes CAP from the capability sets in the JSON file at path; returns the sets changed."""
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    process = spec.get("process", {}) if process_key else spec
    caps = process.get("capabilities") or {}
    changed = [s for s in SETS if CAP in (caps.get(s) or [])]
    if changed:
        for s in changed:
            caps[s] = [c for c in caps[s] if c != CAP]
        tmp = path + ".sys-time.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        os.replace(tmp, path)
    return changed


def main():
    if len(sys.argv) < 3:
        sys.stderr.write("usage: runc_drop_sys_time.py LOG RUNC [args...]\n")
        return 2
    log, runc, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    command = next((a for a in args if a in ("create", "run", "exec")), None)
    target = None
    if command in ("create", "run"):
        bundle = value_after(args, "--bundle") or value_after(args, "-b") or "."
        target = (os.path.join(bundle, "config.json"), True)
    elif command == "exec":
        process = value_after(args, "--process") or value_after(args, "-p")
        if process:
            target = (process, False)
    if target is not None:
        try:
            changed = strip(*target)
        except (OSError, ValueError) as e:
            changed = None
            note = f"cannot read {target[0]}: {e}"
        else:
            note = f"removed {CAP} from {','.join(changed)}" if changed else f"no {CAP} requested"
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{datetime.datetime.now(datetime.timezone.utc).isoformat()} {command} "
                    f"{args[-1]} {target[0]}: {note}\n")
    os.execv(runc, [runc] + args)


if __name__ == "__main__":
    sys.exit(main())
