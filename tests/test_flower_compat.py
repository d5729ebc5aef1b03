"""Canaries for every non-public piece of Flower OncoFed uses (all in :mod:`fl.flower_compat`),
and a check that nothing outside that package imports one.

Each canary fails with a message naming the Flower symbol and what to re-check in
``fl/flower_compat/`` when Flower changes it. Run this file first after upgrading Flower.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fl.flower_compat import FLOWER_VERSION, PUBLIC_MODULES

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("fl", "nodes", "strategies", "bench")
COMPAT = REPO / "fl" / "flower_compat"


@pytest.fixture
def task_identity() -> Any:
    """A task identity for this test (Flower's messages read the run id from it), unset afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    from fl.flower_compat.task import set_task_identity

    saved = {name: vars(TaskIdentity)[f"_{name}"] for name in ("task_id", "run_id", "node_id")}
    set_task_identity(task_id=1, run_id=5, node_id=0)
    yield TaskIdentity
    set_task_identity(**saved)  # as other tests of this session left it


def _canary(ok: bool, symbol: str, recheck: str) -> None:
    assert ok, f"Flower changed {symbol}: re-check {recheck}"


def _keywords(function: Callable[..., Any], symbol: str, names: tuple[str, ...], recheck: str) -> None:
    params = inspect.signature(function).parameters
    missing = [n for n in names if n not in params]
    _canary(not missing, f"{symbol} (no parameter {', '.join(missing)})", recheck)


# ----- the version -------------------------------------------------------------------------------

def test_flower_is_the_version_the_compat_package_was_checked_against() -> None:
    from importlib.metadata import version

    assert version("flwr") == FLOWER_VERSION, (
        f"flwr {version('flwr')} is installed, fl/flower_compat was checked against {FLOWER_VERSION}: run this "
        "file, re-check each failing symbol, then update FLOWER_VERSION and the pin in pyproject.toml")
    pin = [line for line in (REPO / "pyproject.toml").read_text(encoding="utf-8").splitlines() if '"flwr[' in line]
    assert pin and f'"flwr[simulation]=={FLOWER_VERSION}"' in pin[0], f"pyproject.toml must pin Flower exactly: {pin}"


# ----- serde -------------------------------------------------------------------------------------

@pytest.mark.usefixtures("task_identity")
def test_serde_round_trips_messages_contexts_and_records() -> None:
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

    from fl.flower_compat import serde

    content = RecordDict({"a": ArrayRecord([np.ones(3)]), "c": ConfigRecord({"k": b"v"})})
    back = serde.recorddict_from_bytes(serde.recorddict_to_bytes(content))
    _canary(list(back) == ["a", "c"] and back["c"]["k"] == b"v", "flwr.common.serde.recorddict_to/from_proto",
            "fl/flower_compat/serde.py (fl.packing packs content with it)")
    assert serde.recorddict_size(content) == len(serde.recorddict_to_bytes(content))
    assert serde.copy_recorddict(content) is not content
    message = Message(content, 3, "train")
    again = serde.message_from_bytes(serde.message_to_bytes(message))
    _canary(again.metadata.dst_node_id == 3 and again.metadata.message_type == "train",
            "flwr.common.serde.message_to/from_proto, flwr.proto.message_pb2.Message", "fl/flower_compat/serde.py")
    context = Context(run_id=5, node_id=2, node_config={"x": "y"}, state=RecordDict(), run_config={})
    _canary(serde.context_from_bytes(serde.context_to_bytes(context)).node_config == {"x": "y"},
            "flwr.common.serde.context_to/from_proto", "fl/flower_compat/serde.py")
    reply = serde.error_reply_with_metadata(message.metadata, Error(code=7, reason="r"))
    _canary(reply.has_error() and reply.metadata is message.metadata, "flwr.common.serde.make_message",
            "fl/flower_compat/serde.py error_reply_with_metadata (fl.packing.unpack_reply)")


@pytest.mark.usefixtures("task_identity")
def test_metadata_fields_are_where_flower_keeps_them() -> None:
    from flwr.app import Message, RecordDict

    from fl.flower_compat.serde import METADATA_FIELDS, set_metadata

    message = Message(RecordDict(), 1, "train")
    values = {"message_id": "m1", "run_id": 9, "src_node_id": 4, "reply_to_message_id": "m0"}
    set_metadata(message.metadata, **values)
    for name in METADATA_FIELDS:
        _canary(getattr(message.metadata, name) == values[name], f"flwr.app.Metadata.{name} (stored as _{name})",
                "fl/flower_compat/serde.py set_metadata and clientapp_process.message_from_bytes")
    with pytest.raises(ValueError):
        set_metadata(message.metadata, group_id="g")


# ----- SecAgg+ -----------------------------------------------------------------------------------

def test_secaggplus_record_names_and_keys() -> None:
    from fl.flower_compat.secagg import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage

    where = "flwr.common.secure_aggregation.secaggplus_constants"
    recheck = "fl/flower_compat/secagg.py (nodes/secagg_guard.py reads these records)"
    _canary(RECORD_KEY_CONFIGS == "secaggplus_configs", f"{where}.RECORD_KEY_CONFIGS", recheck)
    _canary(RECORD_KEY_STATE == "secaggplus_state", f"{where}.RECORD_KEY_STATE", recheck)
    stages = {"SETUP": "setup", "SHARE_KEYS": "share_keys", "COLLECT_MASKED_VECTORS": "collect_masked_vectors",
              "UNMASK": "unmask"}
    for name, value in stages.items():
        _canary(getattr(Stage, name, None) == value, f"{where}.Stage.{name}", recheck)
    keys = ("STAGE", "SAMPLE_NUMBER", "SHARE_NUMBER", "THRESHOLD", "CLIPPING_RANGE", "TARGET_RANGE", "MOD_RANGE",
            "MAX_WEIGHT", "PUBLIC_KEY_1", "PUBLIC_KEY_2", "DESTINATION_LIST", "CIPHERTEXT_LIST", "SOURCE_LIST",
            "MASKED_PARAMETERS", "ACTIVE_NODE_ID_LIST", "DEAD_NODE_ID_LIST", "NODE_ID_LIST", "SHARE_LIST")
    for name in keys:
        _canary(hasattr(Key, name), f"{where}.Key.{name}", recheck)
    _canary(Key.STAGE == "stage", f"{where}.Key.STAGE", recheck)


def test_the_mod_keeps_the_state_the_node_reads() -> None:
    import sys

    import flwr.client.mod  # noqa: F401

    state = getattr(sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"], "SecAggPlusState", None)
    fields = getattr(state, "__dataclass_fields__", {})
    for field in ("threshold", "clipping_range", "target_range", "rd_seed_share_dict", "sk1_share_dict"):
        _canary(field in fields, f"secaggplus_mod.SecAggPlusState.{field} (kept in the context's "
                "RECORD_KEY_STATE record)",
                "nodes/client_app.py _secure_setup and fl/bench/attacks.py (they read the mod's state)")


def test_secaggplus_crypto_primitives() -> None:
    from fl.flower_compat import secagg_crypto as c

    recheck = "fl/flower_compat/secagg_crypto.py (fl/bench/attacks.py reproduces the mod's masks)"
    sk, pk = c.generate_key_pairs()
    shared = c.generate_shared_key(c.bytes_to_private_key(c.private_key_to_bytes(sk)),
                                   c.bytes_to_public_key(c.public_key_to_bytes(pk)))
    _canary(c.decrypt(shared, c.encrypt(shared, b"x")) == b"x", "secure_aggregation.crypto.symmetric_encryption",
            recheck)
    plain = c.share_keys_plaintext_concat(1, 2, b"a" * 32, b"b" * 32)
    _canary(c.share_keys_plaintext_separate(plain)[2] == b"a" * 32, "secaggplus_utils.share_keys_plaintext_*", recheck)
    _keywords(c.pseudo_rand_gen, "secaggplus_utils.pseudo_rand_gen", ("seed", "num_range", "dimensions_list"), recheck)
    _keywords(c.dequantize, "secure_aggregation.quantization.dequantize",
              ("quantized_parameters", "clipping_range", "target_range"), recheck)
    _keywords(c.factor_extract, "ndarrays_arithmetic.factor_extract", ("parameters",), recheck)
    _keywords(c.combine_shares, "crypto.shamir.combine_shares", ("share_list",), recheck)


# ----- the legacy workflow -----------------------------------------------------------------------

def test_legacy_workflow_pieces() -> None:
    from fl.flower_compat import legacy

    recheck = "fl/flower_compat/legacy.py (strategies/secagg.py builds the workflow's context)"
    _canary(legacy.MAIN_CONFIGS_RECORD == "config", "flwr.server.workflow.constant.MAIN_CONFIGS_RECORD", recheck)
    _canary(legacy.MAIN_PARAMS_RECORD == "parameters", "flwr.server.workflow.constant.MAIN_PARAMS_RECORD", recheck)
    _canary(legacy.WorkflowKey.CURRENT_ROUND == "current_round", "flwr.server.workflow.constant.Key.CURRENT_ROUND",
            recheck)
    _keywords(legacy.GridClientProxy, "flwr.server.compat.grid_client_proxy.GridClientProxy",
              ("node_id", "grid", "run_id"), recheck)
    for name in ("fitres_to_recorddict", "recorddict_to_fitres", "fitins_to_recorddict"):
        _keywords(getattr(legacy, name), f"flwr.compat.common.recorddict_compat.{name}", ("keep_input",), recheck)
    _canary(issubclass(legacy.GridClientProxy, legacy.ClientProxy), "flwr.server.client_proxy.ClientProxy", recheck)


def test_legacy_fitres_round_trip() -> None:
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from fl.flower_compat.legacy import fitres_to_recorddict, recorddict_to_fitres

    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.arange(3.0)]), 1, {"loss": 0.5})
    back = recorddict_to_fitres(fitres_to_recorddict(fitres, keep_input=False), keep_input=True)
    _canary(np.array_equal(parameters_to_ndarrays(back.parameters)[0], np.arange(3.0)) and back.metrics["loss"] == 0.5,
            "flwr.compat.common.recorddict_compat fitres conversions", "fl/wire.py legacy_reply / legacy_reply_parts")


# ----- strategies --------------------------------------------------------------------------------

def test_strategy_internals() -> None:
    from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

    from fl.flower_compat.strategy import OPTIMIZER_MOMENTS, SERVER_MOMENTUM, aggregate_metricrecords

    recheck = "fl/flower_compat/strategy.py (strategies/state.py exports them for --resume)"
    for cls in (FedAdam, FedYogi):
        strategy = cls()
        for attr in OPTIMIZER_MOMENTS:
            _canary(hasattr(strategy, attr), f"flwr.serverapp.strategy.{cls.__name__}.{attr}", recheck)
            _canary(f"self.{attr} =" in inspect.getsource(inspect.getmodule(cls)) or
                    f"self.{attr} =" in inspect.getsource(importlib.import_module("flwr.serverapp.strategy.fedopt")),
                    f"{cls.__name__} no longer assigns self.{attr}", recheck)
    _canary(hasattr(FedAvgM(), SERVER_MOMENTUM), f"flwr.serverapp.strategy.FedAvgM.{SERVER_MOMENTUM}", recheck)
    _keywords(aggregate_metricrecords, "flwr.serverapp.strategy.strategy_utils.aggregate_metricrecords",
              ("records", "weighting_metric_name"), "fl/flower_compat/strategy.py (strategies/central_dp.py)")


# ----- simulation --------------------------------------------------------------------------------

def test_simulation_entry_point() -> None:
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fl.flower_compat.simulation import RUN_SIMULATION_KEYWORDS

    _keywords(_run_simulation, "flwr.simulation.run_simulation._run_simulation", RUN_SIMULATION_KEYWORDS,
              "fl/flower_compat/simulation.py run_simulation_with_context")
    _canary(hasattr(EventType, "PYTHON_API_RUN_SIMULATION_LEAVE"),
            "flwr.supercore.telemetry.EventType.PYTHON_API_RUN_SIMULATION_LEAVE", "fl/flower_compat/simulation.py")


def test_the_actor_pool_pieces_the_early_start_relies_on() -> None:
    from flwr.server.superlink.fleet.vce.backend import raybackend
    from flwr.simulation.ray_transport import ray_actor

    recheck = "fl/flower_compat/warm_start.py (StartedNodes, adopting)"
    _keywords(raybackend.RayBackend.build, "RayBackend.build", ("app_fn",), recheck)
    _keywords(ray_actor.BasicActorPool.__init__, "BasicActorPool.__init__",
              ("actor_type", "client_resources", "actor_kwargs"), recheck)
    _keywords(ray_actor.ClientAppActor.__ray_metadata__.modified_class.__init__, "ClientAppActor.__init__",
              ("on_actor_init_fn",), recheck)
    _keywords(ray_actor.pool_size_from_resources, "pool_size_from_resources", ("client_resources",), recheck)
    backend = inspect.getsource(raybackend)  # the module's source: this session's tests patch init_ray
    _canary("if not ray.is_initialized():" in backend, "RayBackend.init_ray (starts Ray only when it is not up)", recheck)
    _canary("self.pool = BasicActorPool(" in backend and "self.app_fn = app_fn" in backend,
            "RayBackend.build (sets pool and app_fn)", recheck)
    pool = inspect.getsource(ray_actor.BasicActorPool)
    for piece in ("self.pool: list", "self.num_actors", "self.actors_capacity", "def add_actors_to_pool",
                  "actor = self.pool.pop()"):  # the last: idle actors are handed out from the end of the list
        _canary(piece in pool, f"BasicActorPool ({piece!r})", recheck)


# ----- engine: the object-pull retry patch -------------------------------------------------------

def test_object_pulls_take_their_first_wait_from_a_keyword_default() -> None:
    import sys

    from flwr.superlink.grid import http_grid  # noqa: F401 - a caller of the pulls
    from flwr.supernode.runtime import run_clientapp  # noqa: F401 - a caller of the pulls

    from fl.flower_compat.engine import PATCHED_DEFAULT, object_pull_functions

    recheck = "fl/flower_compat/engine.py prompt_object_pulls"
    for function in object_pull_functions():
        defaults = function.__kwdefaults__ or {}
        _canary(defaults.get(PATCHED_DEFAULT) is not None, f"flwr.supercore.inflatable.inflatable_utils."
                f"{function.__name__}(*, {PATCHED_DEFAULT}=...)", recheck)
    import flwr.supernode.start_client_internal  # noqa: F401

    for name in ("flwr.supernode.start_client_internal", "flwr.superlink.grid.http_grid",
                 "flwr.supernode.runtime.run_clientapp"):
        source = inspect.getsource(sys.modules[name])
        _canary(PATCHED_DEFAULT not in source, f"{name} now passes {PATCHED_DEFAULT} itself", recheck)


def test_the_object_pull_patch_sets_and_is_undone() -> None:
    from fl.flower_compat.engine import PATCHED_DEFAULT, object_pull_functions, prompt_object_pulls

    functions = object_pull_functions()
    saved = [dict(f.__kwdefaults__ or {}) for f in functions]
    try:
        assert prompt_object_pulls(0.05)
        assert all(f.__kwdefaults__[PATCHED_DEFAULT] == 0.05 for f in functions)  # type: ignore[index]
    finally:
        for function, kw in zip(functions, saved, strict=True):
            function.__kwdefaults__ = kw


# ----- the SuperNode patches ---------------------------------------------------------------------

def test_the_supernode_loop_and_pull_are_what_the_guard_wraps() -> None:
    import flwr.supernode.start_client_internal as sci

    from fl.flower_compat import supernode

    recheck = "fl/flower_compat/supernode.py install_fab_guard"
    pull = getattr(sci, supernode.GUARDED, None)
    _canary(pull is not None, f"flwr.supernode.start_client_internal.{supernode.GUARDED}", recheck)
    pull = inspect.unwrap(pull)
    params = list(inspect.signature(pull).parameters) if not getattr(pull, "__oncofed_guard__", False) else None
    if params is not None:
        _canary(tuple(params) == supernode.GUARD_KEYWORDS, f"{supernode.GUARDED}'s parameters {params}", recheck)
        source = inspect.getsource(pull)
        _canary("get_fab(" in source and "receive()" in source, f"{supernode.GUARDED} calls receive() and get_fab()",
                recheck)
    loop = inspect.getsource(sci.start_client_internal)
    _canary(f"run_id = {supernode.GUARDED}(" in loop, f"start_client_internal calls {supernode.GUARDED} by name",
            recheck)
    _canary(list(inspect.signature(sci._insert_message).parameters) == ["msg", "state", "store"],
            "flwr.supernode.start_client_internal._insert_message(msg, state, store)", recheck)


def test_the_supernode_waits_are_where_the_clock_expects_them() -> None:
    import flwr.supernode.start_client_internal as sci

    from fl.flower_compat import supernode

    recheck = "fl/flower_compat/supernode.py NodeClock (and nodes/supernode.py's bounds)"
    _canary(supernode.flower_node_waits() == (supernode.FLOWER_IDLE_SLEEP_S, supernode.FLOWER_REPLY_POLL_S),
            f"the SuperNode's waits: {supernode.flower_node_waits()} (expected time.sleep(3) in "
            "start_client_internal, time.sleep(0.5) in _push_messages)", recheck)
    _canary("time.sleep(3)" in inspect.getsource(sci.start_client_internal), "start_client_internal's time.sleep(3)",
            recheck)
    _canary("time.sleep(0.5)" in inspect.getsource(sci._push_messages), "_push_messages' time.sleep(0.5)", recheck)
    _canary(inspect.ismodule(sci.time) or isinstance(sci.time, supernode.NodeClock),
            "flwr.supernode.start_client_internal.time (the module the clock replaces)", recheck)


def test_the_clock_recognises_flowers_waits_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from fl.flower_compat.supernode import NodeClock

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = NodeClock(0.25, 0.05, (0.1,), (3, 0.5))
    for seconds in (3, 3, 0.5, 7):
        clock.sleep(seconds)
    clock.message_stored()
    clock.sleep(3)
    assert slept == [0.25, 0.25, 0.05, 7, 0.1]
    assert clock.monotonic is time.monotonic


def test_supernode_entry_points() -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.supernode.cli.flower_supernode import flower_supernode

    _keywords(build_fab_from_disk, "flwr.cli.build.build_fab_from_disk", ("app",),
              "fl/flower_compat/supernode.py build_fab (fl app hash)")
    _canary(callable(flower_supernode) and not inspect.signature(flower_supernode).parameters,
            "flwr.supernode.cli.flower_supernode.flower_supernode() (reads sys.argv)",
            "fl/flower_compat/supernode.py run_supernode_cli")


# ----- the warm workers' runtime -----------------------------------------------------------------

def test_runtime_api_pieces() -> None:
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    from fl.flower_compat import runtime

    recheck = "fl/flower_compat/runtime.py (nodes/worker.py's Dispatcher)"
    _canary(runtime.TASK_COMPLETED == "completed" and runtime.TASK_FAILED == "failed",
            "flwr.common.constant.SubStatus", recheck)
    _canary(TaskType.CLIENT_APP.value == "flwr-clientapp", "flwr.supercore.constant.TaskType.CLIENT_APP", recheck)
    fields = AcquireTaskRequest.DESCRIPTOR.fields_by_name
    _canary("supported_task_types" in fields and "agentapp_fab_hashes" in fields,
            "flwr.proto.runtime_pb2.AcquireTaskRequest fields", recheck)
    _canary(f'rpc_method="{runtime.ACQUIRE_METHOD}"' in inspect.getsource(runtime.RuntimeHttpClient.AcquireTask),
            f"RuntimeHttpClient.AcquireTask's method {runtime.ACQUIRE_METHOD} (SuperExec authentication protects it)",
            recheck)
    _keywords(runtime.RuntimeHttpClient.from_server_address, "flwr.supercore.runtime.RuntimeHttpClient."
              "from_server_address", ("server_address", "insecure", "root_certificates", "interceptors",
                                      "retry_invoker"), recheck)
    _keywords(runtime.SuperExecAuthHttpInterceptor, "flwr.supercore.interceptors.SuperExecAuthHttpInterceptor",
              ("master_secret", "protected_methods"), recheck)
    _keywords(runtime.RuntimeVersionHttpInterceptor, "flwr.supercore.interceptors.RuntimeVersionHttpInterceptor",
              ("component_name",), recheck)
    _keywords(runtime.RuntimeTokenHttpInterceptor, "flwr.supercore.interceptors.RuntimeTokenHttpInterceptor",
              ("token",), recheck)
    _keywords(runtime.HeartbeatSender, "flwr.supercore.heartbeat.HeartbeatSender", ("heartbeat_fn",), recheck)
    _canary(all(hasattr(runtime.HeartbeatSender, a) for a in ("start", "stop", "is_running")),
            "flwr.supercore.heartbeat.HeartbeatSender.start/stop/is_running", recheck)
    _keywords(runtime.make_task_heartbeat_fn_http, "flwr.supercore.heartbeat.make_task_heartbeat_fn_http",
              ("client",), recheck) if "client" in inspect.signature(runtime.make_task_heartbeat_fn_http).parameters \
        else _canary(len(inspect.signature(runtime.make_task_heartbeat_fn_http).parameters) == 1,
                     "flwr.supercore.heartbeat.make_task_heartbeat_fn_http(client)", recheck)
    _keywords(runtime.pull_task_input, "flwr.supernode.runtime.run_clientapp.pull_task_input", ("client",), recheck)
    _keywords(runtime.push_message, "flwr.supernode.runtime.run_clientapp.push_message",
              ("client", "message", "context"), recheck)
    _keywords(runtime.push_task_output, "flwr.supernode.runtime.run_clientapp.push_task_output",
              ("client", "context", "sub_status", "details"), recheck)
    _keywords(runtime.make_simple_http_retry_invoker, "flwr.supercore.retry.make_simple_http_retry_invoker", (),
              recheck)


def test_task_identity_and_empty_run() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fl.flower_compat.task import empty_run, set_task_identity, task_id

    recheck = "fl/flower_compat/task.py (fl/bench/inprocess.py, nodes/worker.py)"
    saved = {name: vars(TaskIdentity)[f"_{name}"] for name in ("task_id", "run_id", "node_id")}
    try:
        set_task_identity(task_id=11, run_id=12, node_id=13)
        _canary((task_id(), TaskIdentity.run_id, TaskIdentity.node_id) == (11, 12, 13),
                "flwr.supercore.task_identity.TaskIdentity.task_id/run_id/node_id", recheck)
    finally:
        set_task_identity(**saved)
    _canary(empty_run(42).run_id == 42, "flwr.supercore.run.Run.create_empty(run_id)", recheck)


def test_the_worker_process_module_loads_by_path_and_uses_flowers_pieces() -> None:
    import sys

    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.constant import ErrorCode
    from flwr.supercore.app_utils import start_parent_process_monitor

    from nodes.worker_main import FLOWER_COMPAT, flower_compat

    recheck = "fl/flower_compat/clientapp_process.py (nodes/worker_main.py)"
    _keywords(install_from_fab, "flwr.cli.install.install_from_fab", ("fab_file", "skip_prompt"), recheck)
    _keywords(get_load_client_app_fn, "flwr.clientapp.utils.get_load_client_app_fn",
              ("default_app_ref", "app_path", "multi_app"), recheck)
    _keywords(start_parent_process_monitor, "flwr.supercore.app_utils.start_parent_process_monitor", ("parent_pid",),
              recheck)
    _canary(int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION) == 2, "flwr.common.constant.ErrorCode."
            "CLIENT_APP_RAISED_EXCEPTION", recheck)
    # by path, under a name of its own, importing nothing of OncoFed's: the app bundle's packages come first
    tree = ast.parse(FLOWER_COMPAT.read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "typing", "flwr"}, imported
    before = set(sys.modules)
    module = flower_compat()
    assert module.CLIENT_APP_RAISED_EXCEPTION == 2
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in CHECKED}


# ----- nothing else imports Flower's non-public API ----------------------------------------------

def _public_names(module: str) -> set[str]:
    return set(getattr(importlib.import_module(module), "__all__", ()))


def nonpublic_flower_imports(source: str, filename: str = "<planted>") -> list[str]:
    """``file:line: what`` for every import of a non-public Flower module or name in ``source``
    (see :mod:`fl.flower_compat` for what is public)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if (a.name == "flwr" or a.name.startswith("flwr.")) and a.name not in PUBLIC_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and (node.module == "flwr" or node.module.startswith("flwr.")):
            if node.module not in PUBLIC_MODULES:
                found.append(f"{where}: from {node.module} import ...")
                continue
            public = _public_names(node.module)
            found += [f"{where}: from {node.module} import {a.name}" for a in node.names
                      if a.name.startswith("_") or a.name not in public]
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)) \
                and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__") \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                and node.args[0].value.startswith("flwr") and node.args[0].value not in PUBLIC_MODULES:
            found.append(f"{where}: import_module({node.args[0].value!r})")
    return found


def checked_files() -> list[Path]:
    return [path for package in CHECKED if (REPO / package).is_dir() for path in sorted((REPO / package).rglob("*.py"))
            if COMPAT not in path.parents]


def test_no_module_outside_flower_compat_imports_a_nonpublic_flower_module_or_name() -> None:
    found = [hit for path in checked_files()
             for hit in nonpublic_flower_imports(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert not found, ("non-public Flower imports outside fl/flower_compat/ (move them there, each with a canary "
                       "in tests/test_flower_compat.py):\n" + "\n".join(found))


@pytest.mark.parametrize("source, reported", [
    ("from flwr.supercore.retry import x\n", True),
    ("import flwr.supernode.start_client_internal as sci\n", True),
    ("from flwr.common.serde import make_message\n", True),
    ("from flwr.common import serde\n", True),
    ("from flwr.app import _private\n", True),
    ("from flwr.simulation.run_simulation import _run_simulation\n", True),
    ("import importlib\nimportlib.import_module('flwr.proto.message_pb2')\n", True),
    ("import flwr\n", True),
    ("from flwr.common import Message\n", False),
    ("from flwr.simulation import run_simulation\n", False),
    ("from flwr.serverapp.strategy import FedAvg\n", False),
    ("import flwr.client.mod\n", False),
    ("def f():\n    from flwr.app import ConfigRecord, RecordDict\n", False),
])
def test_the_import_check_reports_a_planted_import(source: str, reported: bool) -> None:
    hits = nonpublic_flower_imports(source, "planted.py")
    assert bool(hits) is reported, hits
    if reported:
        assert hits[0].startswith("planted.py:"), hits
