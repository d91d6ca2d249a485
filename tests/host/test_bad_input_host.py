"""Bad-input catalogue against a live VM (issue 13): every bad input that names a VM, its VM
root or its socket is run by the real CLI (a separate process, --test-mode with LUO and
kexec_file_load skipped where update must get past the host checks) while a real QEMU 11.1
guest runs; each must fail with its specific error, exit 1 or 2, no traceback, and leave the
guest running with no migration ever started and nothing left in QEMU."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest

from luoagent.adapters import procfs, qmp_client

from test_update_rollback_host import HOST_SKIP, REPO, guest_elf, kernel_image  # noqa: F401

pytestmark = [pytest.mark.host, pytest.mark.timeout(900)]


def _cli(lab_qemu, argv, test_mode=False):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUOAGENT_")}
    env.update(LUOAGENT_QEMU=str(lab_qemu), PYTHONPATH=str(REPO))
    mode = []
    if test_mode:
        env["LUOAGENT_TEST_SKIP"] = HOST_SKIP
        mode = ["--test-mode"]
    return subprocess.run([sys.executable, "-m", "luoagent", "--log-format", "console", *mode, *argv],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


async def _qemu_state(sock) -> dict:
    async with await qmp_client.Qmp.connect(sock, timeout=30) as q:
        return {"status": await q.status(), "migrate": await q.execute("query-migrate"),
                "fdsets": await q.execute("query-fdsets"),
                "mode": (await q.execute("query-migrate-parameters")).get("mode")}


@pytest.fixture(scope="module")
def live(lab_qemu, guest_elf, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("live")
    root = tmp / "vms"
    r = _cli(lab_qemu, ["vm", "--root", str(root), "start", "g", "--memory", "64M", "--json",
                        "--", "-machine", "pc", "-kernel", str(guest_elf)])
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    yield {"root": root, "sock": record["qmp_socket"], "pid": record["pid"], "tmp": tmp}
    if procfs.pid_alive(record["pid"]):
        os.kill(record["pid"], signal.SIGKILL)


CASES = [  # (argv, test mode, exit status, what the message must say)
    ("update --kernel {K} --vm-root {R} --vm g --timeout 0", True, 2, r"--timeout 0: give the seconds"),
    ("update --kernel {T}/nonexistent --vm-root {R} --vm g", True, 1, r"nonexistent does not exist; pass --kernel"),
    ("update --kernel /etc/passwd --vm-root {R}", True, 1, r"not an x86 bzImage"),
    ("update --kernel {K} --vm-root {R} --vm g --vm g={S}", True, 2, r"VM 'g' named twice"),
    ("update --kernel {K} --vm-root {R} --vm g --vm gone={T}/none.sock", True, 1,
     r"VM gone: QMP socket .*none.sock does not exist; is the VM running\?"),
    ("update --kernel {K} --vm-root {R} --vm g --vm x/y={S}", True, 2, r"VM name 'x/y' contains '/'"),
    ("update --kernel {K} --vm-root {R} --vm g", False, 1, r"this host cannot do a live update .*fix:"),
    ("vm --root {R} start g --memory 64M -- -machine pc", False, 2,
     r"VM 'g' is already running \(pid \d+\); stop it first: luoagent vm stop g"),
    ("vm --root /etc/passwd/x start h --memory 64M", False, 2, r"cannot create VM directory /etc/passwd/x: .*pass\s+--vm-root"),
    ("vm --root {R} start h --memory 64M -- -machine bogus-machine", False, 1,
     r"VM 'h' did not come up: .*QEMU said: .*bogus-machine"),
    ("restore --vm-root {R}", False, 1, r"Live Update Orchestrator|/dev/liveupdate"),
    ("restore --vm-root {R} --from-rescue {R}/g", False, 1, r"is not a luoagent rescue image"),
]


@pytest.mark.parametrize("argv, test_mode, code, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_leaves_the_live_vm_alone(live, lab_qemu, kernel_image, argv, test_mode, code, pattern):  # noqa: F811
    args = [a.replace("{K}", str(kernel_image)).replace("{R}", str(live["root"])).replace("{S}", live["sock"])
            .replace("{T}", str(live["tmp"])) for a in argv.split()]
    r = _cli(lab_qemu, args, test_mode)
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert re.search(pattern, r.stdout + r.stderr, re.S), r.stdout + r.stderr
    state = asyncio.run(_qemu_state(live["sock"]))
    assert state["status"] == "running" and state["fdsets"] == [] and state["mode"] == "normal", state
    assert "status" not in state["migrate"], f"a migration ran: {state['migrate']}"
    assert procfs.pid_alive(live["pid"])


def test_a_concurrent_update_is_refused_and_the_vm_untouched(live, lab_qemu, kernel_image):  # noqa: F811
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from luoagent.workflows import vm
        with vm.agent_lock({str(live['root'])!r}, "update"):
            print("held", flush=True)
            time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        assert holder.stdout.readline().strip() == "held"
        for argv, mode in ((["update", "--kernel", str(kernel_image), "--vm-root", str(live["root"])], True),
                           (["vm", "--root", str(live["root"]), "stop", "g"], False)):
            r = _cli(lab_qemu, argv, mode)
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
            assert f"(pid {holder.pid} holds" in r.stderr and "wait for it to finish" in r.stderr, r.stderr
            state = asyncio.run(_qemu_state(live["sock"]))
            assert state["status"] == "running" and "status" not in state["migrate"], state
    finally:
        holder.kill()
        holder.wait()
