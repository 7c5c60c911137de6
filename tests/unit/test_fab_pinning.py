"""A hostile coordinator cannot run its own code at a hospital through the FAB it submits
(experiments/pinned_clientapp.py).

Real FABs (Flower's `build_fab_from_files`, installed by Flower's `install_from_fab` into a FLWR_HOME),
run in forked ClientApp processes set up as the site sets them up (`prepare_clientapp_process`): the
warm worker (`SiteWorker`) and the one-off fork (`warm_clientapp._run_one_clientapp`). The refusal goes
through Flower's own `run_clientapp` with only its Runtime API replaced (no SuperNode here), so what is
checked is the error reply Flower pushes to the coordinator.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import sys
import time
import tomllib
from pathlib import Path

import pytest
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.exit import ExitCode

from medtwin.experiments.pinned_clientapp import SITE_CLIENTAPP_REF
from medtwin.experiments.site_worker import SiteWorker
from test_site_worker import TASK_TIMEOUT_S, wait_idle  # tests/unit is on sys.path (rootdir-relative imports)

REFUSAL = "this hospital runs only medtwin's own ClientApp"
PUBLISHER, PROJECT, VERSION = "coordinator", "evilapp", "1.0.0"


def _pyproject(clientapp: str) -> bytes:
    return (
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        f'[project]\nname = "{PROJECT}"\nversion = "{VERSION}"\n\n'
        f'[tool.flwr.app]\npublisher = "{PUBLISHER}"\n\n'
        f'[tool.flwr.app.components]\nserverapp = "evil:server"\nclientapp = "{clientapp}"\n'
    ).encode()


def _marker_module(marker: Path) -> bytes:
    """A module whose import is the coordinator's code running at the site: it leaves a marker file."""
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\napp = None\nclient_app = None\n".encode()


def _build_fab(folder: Path, clientapp: str, modules: dict[str, bytes]) -> Path:
    from flwr.cli.build import build_fab_from_files

    fab, _ = build_fab_from_files({"pyproject.toml": _pyproject(clientapp), **modules})
    path = folder / f"{hashlib.sha256(fab).hexdigest()[:12]}.fab"
    path.write_bytes(fab)
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def _append(report: str, record: dict) -> None:
    with open(report, "a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")


# --- tasks a forked ClientApp process runs (module-level: found by name) ---


class _NoRuntimeServer:
    """Stands in for Flower's RuntimeHttpClient: heartbeats succeed, nothing else is called on it."""

    @classmethod
    def from_server_address(cls, **_: object) -> _NoRuntimeServer:
        return cls()

    def SendTaskHeartbeat(self, _request: object) -> object:  # noqa: N802 - Flower's method name
        return type("Reply", (), {"success": True})()

    def close(self) -> None:
        pass


def flower_task(arguments: list[str]) -> int:
    """One ClientApp task through Flower's `run_clientapp`, its Runtime API (the SuperNode) replaced by this FAB
    and one message; the reply and final status it pushes are appended to the report."""
    from flwr.app import Context, Message, Metadata, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp

    fab_file, report, *flags = arguments
    fab = Path(fab_file).read_bytes()
    fab_hash = hashlib.sha256(fab).hexdigest()
    path_before = list(sys.path)

    def pull_task_input(_client: object) -> tuple:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 7, 1, 2
        run = Run.create_empty(1)
        run.fab_id, run.fab_version, run.fab_hash = f"{PUBLISHER}/{PROJECT}", VERSION, fab_hash
        metadata = Metadata(
            run_id=1, message_id="m1", src_node_id=0, dst_node_id=2, reply_to_message_id="", group_id="1",
            created_at=time.time(), ttl=600.0, message_type="train",
        )  # fmt: skip
        context = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
        return Message(metadata=metadata, content=RecordDict()), context, run, Fab(fab_hash, fab, {})

    def push_message(_client: object, message: Message, _context: object) -> None:
        _append(report, {"error_code": message.error.code, "reason": message.error.reason} if message.has_error() else {"reply": "content"})

    def push_task_output(client: object, context: object, sub_status: str, details: str) -> None:
        _append(report, {"sub_status": sub_status, "details": details, "sys_path_unchanged": sys.path == path_before})

    run_clientapp.pull_task_input, run_clientapp.push_message, run_clientapp.push_task_output = pull_task_input, push_message, push_task_output
    run_clientapp.RuntimeHttpClient = _NoRuntimeServer
    run_clientapp.run_clientapp(
        runtime_api_address="127.0.0.1:1", token="task-token", insecure=True, runtime_dependency_install="--allow-runtime-dependency-installation" in flags
    )
    return 0


def load_task(arguments: list[str]) -> int:
    """What `run_clientapp` does with a task's FAB (install it, make the loader, load), then what the process
    holds: the app it got, `sys.path`, and every loaded module that came from the FAB's folder."""
    from flwr.supernode.runtime import run_clientapp

    fab_file, report = arguments
    fab = Path(fab_file).read_bytes()
    path_before = list(sys.path)
    app_dir = run_clientapp.install_from_fab(fab, skip_prompt=True)
    load_client_app_fn = run_clientapp.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    client_app = load_client_app_fn(f"{PUBLISHER}/{PROJECT}", VERSION, hashlib.sha256(fab).hexdigest())
    import medtwin.experiments.flower_apps as installed  # the site's own, already imported by the load

    from_fab = [name for name, module in list(sys.modules.items()) if str(getattr(module, "__file__", "") or "").startswith(str(app_dir))]
    _append(report, {
        "is_installed_object": client_app is installed.client_app, "installed_file": installed.__file__, "app_dir": str(app_dir),
        "sys_path_unchanged": sys.path == path_before, "modules_from_fab": from_fab,
    })  # fmt: skip
    return 0


def stock_flower_task(arguments: list[str]) -> int:
    """Flower's own loader on the same installed FAB: the attack the pinning stops is real."""
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    fab_file, _report = arguments
    fab = Path(fab_file).read_bytes()
    install_from_fab(fab, skip_prompt=True)
    try:
        get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(f"{PUBLISHER}/{PROJECT}", VERSION, hashlib.sha256(fab).hexdigest())
    except Exception:  # noqa: BLE001 - the marker app is no ClientApp; its import already ran
        pass
    return 0


def site_task(arguments: list[str]) -> int:
    """The warm worker's task: a whole ClientApp task through Flower ("flower") or the FAB's load alone ("load")."""
    kind, *rest = arguments
    return {"flower": flower_task, "load": load_task}[kind](rest)


# --- tests ---


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))  # the forked ClientApp processes install FABs here
    return home


def test_medtwins_own_fab_names_the_pinned_clientapp() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] == SITE_CLIENTAPP_REF


def test_a_fab_naming_its_own_module_is_refused_without_importing_it(tmp_path: Path, flwr_home: Path) -> None:
    from medtwin.experiments.warm_clientapp import _run_one_clientapp

    marker, report = tmp_path / "coordinator-code-ran", tmp_path / "report.jsonl"
    fab_file = _build_fab(tmp_path, "evil:app", {"evil.py": _marker_module(marker)})
    context = multiprocessing.get_context("fork")
    one_off = context.Process(target=_run_one_clientapp, args=(flower_task, [str(fab_file), str(report)]))  # the busy-worker path
    one_off.start()
    one_off.join(TASK_TIMEOUT_S)
    assert one_off.exitcode is not None, "the one-off ClientApp process did not end"
    reply, status = _records(report)
    assert reply["error_code"] == ErrorCode.CLIENT_APP_RAISED_EXCEPTION  # the error reply the coordinator receives
    for text in (reply["reason"], status["details"]):
        assert REFUSAL in text and "'evil:app'" in text and repr(SITE_CLIENTAPP_REF) in text
    assert status["sub_status"] == SubStatus.FAILED and status["sys_path_unchanged"]
    assert not marker.exists(), "the FAB's module was imported at the site"

    stock = context.Process(target=stock_flower_task, args=([str(fab_file), str(report)],))
    stock.start()
    stock.join(TASK_TIMEOUT_S)
    assert marker.exists(), "control: Flower's own loader imports the FAB's module"


def test_a_site_never_installs_a_fabs_dependencies_even_when_told_to(tmp_path: Path, flwr_home: Path) -> None:
    from medtwin.experiments.warm_clientapp import _run_one_clientapp

    report = tmp_path / "report.jsonl"
    fab_file = _build_fab(tmp_path, SITE_CLIENTAPP_REF, {})
    arguments = [str(fab_file), str(report), "--allow-runtime-dependency-installation"]  # as Flower's executor passes it
    one_off = multiprocessing.get_context("fork").Process(target=_run_one_clientapp, args=(flower_task, arguments))
    one_off.start()
    one_off.join(TASK_TIMEOUT_S)
    assert one_off.exitcode is not None, "the one-off ClientApp process did not end"
    reply, status = _records(report)
    assert "this hospital does not install a FAB's dependencies" in reply["reason"]
    assert status["sub_status"] == SubStatus.FAILED


def test_the_warm_worker_refuses_a_foreign_fab_then_runs_its_own_app_unshadowed(tmp_path: Path, flwr_home: Path) -> None:
    marker, report = tmp_path / "coordinator-code-ran", tmp_path / "report.jsonl"
    foreign = _build_fab(tmp_path, "evil:app", {"evil.py": _marker_module(marker)})
    # names the pinned reference but ships its own copy of that module, and a top-level module of its own
    shadowing = _build_fab(tmp_path, SITE_CLIENTAPP_REF, {
        "medtwin/__init__.py": b"", "medtwin/experiments/__init__.py": b"",
        "medtwin/experiments/flower_apps.py": _marker_module(marker), "opacus_extensions.py": _marker_module(marker),
    })  # fmt: skip
    worker = SiteWorker(multiprocessing.get_context("fork"), task=site_task)
    try:
        orders = [("flower", foreign), ("load", shadowing), ("load", shadowing)]  # the third finds the FAB installed
        for done, (kind, fab_file) in enumerate(orders, start=1):
            assert worker.submit(done, [kind, str(fab_file), str(report)])
            wait_idle(worker, done=done)
            assert worker.last_exit_code == (ExitCode.TASK_PROC_EXCEPTION if kind == "flower" else 0)
    finally:
        worker.close()
    reply, status, *loads = _records(report)
    assert reply["error_code"] == ErrorCode.CLIENT_APP_RAISED_EXCEPTION and REFUSAL in reply["reason"]
    assert status["sub_status"] == SubStatus.FAILED
    assert len(loads) == 2
    for loaded in loads:
        assert loaded["is_installed_object"] and loaded["sys_path_unchanged"] and loaded["modules_from_fab"] == []
        assert not loaded["installed_file"].startswith(loaded["app_dir"])
        assert (Path(loaded["app_dir"]) / "medtwin" / "experiments" / "flower_apps.py").is_file()  # the FAB did ship its copy
    assert not marker.exists(), "a module the FAB shipped was imported at the site"


def test_the_site_executor_launches_no_other_task_type(tmp_path: Path) -> None:
    """A FAB declaring an `agentapp` makes the SuperNode create tasks Flower runs with its stock loader."""
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

    from medtwin.experiments.warm_clientapp import WarmWorkerExecutor

    executor = WarmWorkerExecutor(preload=(), task=load_task)
    try:
        for task_type in set(TaskType) - {TaskType.CLIENT_APP}:
            spec = ExecutionSpec(
                task_type=task_type, runtime_api_address="127.0.0.1:9", token="t", insecure=True, root_certificates_path=None,
                runtime_dependency_install=False, parent_pid=None, suppress_output=False, task_id=5,
            )  # fmt: skip
            result = executor.launch(spec)
            assert result.status == LaunchResultStatus.FAILED and REFUSAL in (result.message or ""), task_type
        assert not executor.worker.busy and executor._children == []
    finally:
        executor.close()
