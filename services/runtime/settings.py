"""The suite's settings: one typed object, built and checked once at start-up.

Read from `<home>/cortex.toml` (written, commented, by `cortex init`). Unknown keys and
bad values are fatal with a message that names the key. Precedence for task settings:
the task's own value > the task type's > the global default.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from cortex.protocol import locate, wire
from cortex.protocol.vocabulary import window_seconds

FSYNC_POLICIES = ("always", "group", "off")

DEFAULT_HANDLERS = {
    "echo": "cortex.services.pool.handlers:echo",
    "sleep": "cortex.services.pool.handlers:sleep",
    "simulated_agent": "cortex.services.pool.handlers:simulated_agent",
    "fail": "cortex.services.pool.handlers:fail",
    "llm": "cortex.services.pool.llm:llm",
}

DEFAULT_CONFIG = """\
# Cortex configuration. Every key is optional; the values shown are the defaults.

[suite]
# Journal fsync policy: "always" (fsync every record: safest, slowest),
# "group" (one fsync per loop turn covering every record of that turn: nothing
# acknowledged is lost on a crash or power cut), "off" (the OS decides: a process
# crash loses nothing, a power cut may lose the last seconds).
fsync = "group"
# Seconds between heartbeats on the bus; a peer silent for 3 of them is dead.
heartbeat_interval = 1.0
# A worker or service with no call to or from it for 2 intervals (an idle worker) is
# beaten every this many intervals, and may be silent 3 times that long: an idle fleet
# wakes less, and a hung idle peer is found later. 1: every interval.
quiet_heartbeat_every = 3
# Seconds between human-readable snapshots under state/.
snapshot_interval = 5.0

[bus]
# Endpoints default to ipc:// sockets under <home>/run/. Use tcp:// to span machines.
# bus = "tcp://127.0.0.1:5555"
# On tcp the suite serves with CurveZMQ and admits only the keys `cortex keys` lists; it
# refuses to start without its key pair (`cortex keys make`) unless you write
# insecure_tcp = true         # plaintext: anyone who reaches the port is served
# key_file = "~/alice.key"    # on another machine: the key file its clients connect with
# max_unread_mb = 64.0        # MiB sent to one client or worker and not yet read; past
                              # it the broker disconnects it as a slow reader

[scheduler]
max_queue_per_type = 500     # admission rejects non-critical tasks past this (queue_full)
max_wait = 1800.0            # seconds; admission rejects when the estimated start is later
default_timeout = 300.0      # seconds a task may run
default_retries = 2          # re-runs after a lost worker or a timeout
task_heartbeat = 5.0         # seconds between a running task's heartbeats
retention = 10000            # finished tasks remembered (state, idempotency key) for queries
keep_results = 600.0         # seconds a finished task keeps its payload and result in memory
keep_results_mb = 64.0       # MiB of finished tasks' payloads and results kept at most; past
                             # either, the oldest are trimmed (still in the event log:
                             # `task.status` says `trimmed`, the client fetches the result)
aging = 30.0                 # seconds of waiting that lift a task one priority level
memory_threshold = 80.0      # % of memory used above which non-critical work waits
retrain_every = 500          # completions between background retrains of the predictor (0: never)
scale_backlog = 5.0          # predicted seconds of queued work per worker that adds a worker
worker_start = 0.5           # seconds a new worker takes to start (then learned): a critical
                             # task surges only if no busy worker frees sooner than this
prefetch = 1                 # tasks a busy worker may hold to start the moment its task ends
                             # (0: none); a higher-priority task recalls them (1 at most)
prefetch_pause = 0.2         # seconds after a critical task is queued during which no slot of
                             # its type is filled: a burst of critical tasks then finds workers
                             # freeing up instead of recalling every slot for each (0: never)
critical_reserve = 1         # idle workers of that type kept meanwhile for critical tasks
                             # alone, so the next one starts at once (0: none; never a
                             # type's only workers)
lease = true                 # hold a lease of tokens from the ledger and carve tasks'
                             # reservations from it (no ledger round trip per task)

[ledger]
budget = 100000000           # global token budget
window = ""                  # "", "daily" or "rolling:<seconds>"
# Sub-budgets per task type or agent:
# [ledger.budgets."type:llm"]
# limit = 500000
# window = "daily"

[pool]
# Worker groups: each group's workers take every type listed.
[pool.groups.default]
count = 20
types = ["echo", "sleep", "simulated_agent", "fail"]
max_tasks = 0                # recycle a worker after this many tasks (0: never)
max_rss_mb = 0               # recycle a worker above this RSS (0: never)
max = 24                     # ceiling with surge (critical tasks) and autoscaled workers
idle_exit = 10.0             # seconds an extra worker may sit idle before it retires

[handlers]
# task type = "module:function" (a Python callable taking the task context), or
# { command = ["prog", "arg"] } for an external program fed the task as JSON on stdin.
echo = "cortex.services.pool.handlers:echo"
sleep = "cortex.services.pool.handlers:sleep"
simulated_agent = "cortex.services.pool.handlers:simulated_agent"
fail = "cortex.services.pool.handlers:fail"
llm = "cortex.services.pool.llm:llm"   # needs the llm extra: pip install 'cortex-agents[llm]'

# Model providers for `llm` tasks: any OpenAI-compatible chat-completions endpoint.
# The key is read when a call is made, from an environment variable or a file only its
# owner can read (chmod 600); it is never written under the home. Limits: 0 is none.
# [providers.openai]
# base_url = "https://api.openai.com/v1"
# model = "gpt-4o-mini"
# api_key_env = "OPENAI_API_KEY"     # or: api_key_file = "/home/me/.openai-key"
# requests_per_window = 500
# tokens_per_window = 200000
# concurrent = 8
# window = 60.0                      # seconds
# timeout = 120.0                    # seconds the provider may stay silent during a call

[routing]
# Choosing the task type from the description (`--type auto`).
examples = ""                # JSONL of {"type", "description"} to learn from, beside the
                             # history of typed tasks; relative to the home
min_confidence = 0.5         # below this (0..1) a task goes to the fallback type
fallback = ""                # task type for unsure routes; "" refuses them with the candidates
retrain_every = 500          # typed tasks submitted between background retrains (0: never)

[events]
max_file_bytes = 67108864    # rotate JSONL files past this size (and every UTC day)
postgres_url = ""            # e.g. "postgresql://cortex@localhost/cortex" to copy events there
metrics_port = 0             # Prometheus /metrics on 127.0.0.1: 0 any free port (see
                             # run/metrics.url and `cortex status`), -1 off; scrapes
                             # carry the bearer token in run/metrics.token

[dashboard]
enabled = true               # the live web dashboard (`cortex dashboard` prints its URL)
port = 0                     # on 127.0.0.1 only: 0 any free port
refresh = 1.0                # seconds between its status polls of the services
"""


class ConfigError(Exception):
    code = "bad_config"
    exit_code = 8  # what a service or the CLI exits with when refusing a configuration


@dataclass(frozen=True)
class SuiteSettings:
    fsync: str = "group"
    heartbeat_interval: float = 1.0
    quiet_heartbeat_every: int = 3
    snapshot_interval: float = 5.0


@dataclass(frozen=True)
class BusSettings:
    bus: str = ""  # endpoints: "" is ipc:// under run/
    events_in: str = ""
    events_live: str = ""
    max_connections: int = 0  # per listening socket; 0: half the descriptor limit
    # MiB sent to one client or worker and not yet proven read; past it the broker
    # disconnects it as a slow reader (above the 1 MiB message limit by a margin).
    max_unread_mb: float = 64.0
    insecure_tcp: bool = False  # true: serve tcp endpoints in plaintext (no keys)
    key_file: str = ""  # a client's CurveZMQ key file (on another machine than the suite)


@dataclass(frozen=True)
class SchedulerSettings:
    max_queue_per_type: int = 500
    max_wait: float = 1800.0
    default_timeout: float = 300.0
    default_retries: int = 2
    task_heartbeat: float = 5.0
    retention: int = 10000
    keep_results: float = 600.0
    keep_results_mb: float = 64.0
    aging: float = 30.0
    memory_threshold: float = 80.0
    retrain_every: int = 500
    scale_backlog: float = 5.0
    worker_start: float = 0.5
    prefetch: int = 1
    prefetch_pause: float = 0.2
    critical_reserve: int = 1
    lease: bool = True


@dataclass(frozen=True)
class TypesSettings:
    """[types]: task types served by workers outside the pool (`external`), accepted
    before one is seen; any other type no worker serves is refused once the scheduler has
    run `grace` seconds."""
    external: tuple[str, ...] = ()
    grace: float = 30.0


@dataclass(frozen=True)
class LedgerSettings:
    budget: int = 100_000_000
    window: str = ""
    budgets: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    count: int
    types: tuple[str, ...]
    max_tasks: int = 0
    max_rss_mb: float = 0
    max: int = 0  # ceiling with surge and autoscaled workers (>= count)
    idle_exit: float = 10.0  # seconds an extra worker may sit idle before it retires


@dataclass(frozen=True)
class EventSettings:
    max_file_bytes: int = 64 << 20
    postgres_url: str = ""
    metrics_port: int = 0


@dataclass(frozen=True)
class RoutingSettings:
    examples: str = ""  # absolute once loaded ("" when none)
    min_confidence: float = 0.5
    fallback: str = ""
    retrain_every: int = 500


@dataclass(frozen=True)
class ProviderSettings:
    """A model provider (`[providers.NAME]`): where it is, how to find its key, its limits
    (0: none). The key itself is never held here: it is read at call time."""
    name: str = ""
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""
    api_key_file: str = ""
    requests_per_window: int = 0
    tokens_per_window: int = 0
    concurrent: int = 0
    window: float = 60.0
    timeout: float = 120.0


@dataclass(frozen=True)
class DashboardSettings:
    enabled: bool = True
    port: int = 0
    refresh: float = 1.0


@dataclass(frozen=True)
class Settings:
    home: Path
    suite: SuiteSettings
    bus: BusSettings
    scheduler: SchedulerSettings
    ledger: LedgerSettings
    groups: tuple[WorkerGroup, ...]
    handlers: dict
    events: EventSettings
    dashboard: DashboardSettings = DashboardSettings()
    routing: RoutingSettings = RoutingSettings()
    providers: dict = field(default_factory=dict)  # name -> ProviderSettings
    types: TypesSettings = TypesSettings()

    def provider_for(self, payload) -> ProviderSettings:
        """The provider a task's payload names, else the only one configured."""
        name = payload.get("provider") if isinstance(payload, dict) else None
        if name is None:
            if len(self.providers) == 1:
                return next(iter(self.providers.values()))
            if not self.providers:
                raise ConfigError("no provider configured: add [providers.NAME] to cortex.toml")
            raise ConfigError(f"{len(self.providers)} providers configured: name one of "
                              f"{sorted(self.providers)} in payload['provider']")
        if not isinstance(name, str) or name not in self.providers:
            raise ConfigError(f"unknown provider {name!r}: configured are {sorted(self.providers)}")
        return self.providers[name]


def _table(raw, name: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}]: must be a table, got {raw!r}")
    return raw


def _number(value, where: str, lo: float = 0.0, integer: bool = False):
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value < lo:
        raise ConfigError(f"{where}: must be a {'whole ' if integer else ''}number >= {lo}, "
                          f"got {value!r}")
    return value


DAY = 86400.0
# The range of every number a section holds ("section.key": (lowest, highest)): past it a
# setting is refused at start, not discovered by a service that crash-loops on it. A
# number without a row must be finite and >= 0.
RANGES: dict[str, tuple[float, float]] = {
    "suite.heartbeat_interval": (0.01, 60.0),
    "suite.quiet_heartbeat_every": (1, 60),
    "suite.snapshot_interval": (0.1, DAY),
    "bus.max_connections": (0, 1_000_000),
    "bus.max_unread_mb": (4.0, 1 << 20),
    "scheduler.max_queue_per_type": (0, 10_000_000),
    "scheduler.max_wait": (0.0, 365 * DAY),
    "scheduler.default_timeout": (0.001, 7 * DAY),
    "scheduler.default_retries": (0, 100),
    "scheduler.task_heartbeat": (0.05, 3600.0),
    "scheduler.retention": (0, 10_000_000),
    "scheduler.keep_results": (0.0, 365 * DAY),
    "scheduler.keep_results_mb": (0.0, 1 << 20),
    "scheduler.aging": (0.0, 365 * DAY),
    "scheduler.memory_threshold": (0.0, 100.0),
    "scheduler.retrain_every": (0, 100_000_000),
    "scheduler.scale_backlog": (0.0, DAY),
    "scheduler.worker_start": (0.0, 3600.0),
    "scheduler.prefetch": (0, 1),
    "scheduler.prefetch_pause": (0.0, 3600.0),
    "scheduler.critical_reserve": (0, 1000),
    "ledger.budget": (0, (1 << 63) - 1),
    "events.max_file_bytes": (4096, 1 << 40),
    "events.metrics_port": (-1, 65535),
    "routing.min_confidence": (0.0, 1.0),
    "routing.retrain_every": (0, 100_000_000),
    "dashboard.port": (0, 65535),
    "dashboard.refresh": (0.1, 60.0),
}


def _in_range(value, where: str, key: str):
    lo, hi = RANGES.get(key, (0, math.inf))
    _number(value, where, lo=lo)
    if value > hi:
        raise ConfigError(f"{where}: must be at most {hi:g}, got {value!r}")
    return value


def _section(cls, raw: dict, name: str):
    raw = _table(raw, name)
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {', '.join(sorted(unknown))}")
    values = {}
    for key, value in raw.items():
        default = known[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"[{name}] {key}: expected true or false, got {value!r}")
        if isinstance(default, bool) or default is None:
            values[key] = value
            continue
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, type(default)) or isinstance(value, bool):
            raise ConfigError(f"[{name}] {key}: expected {type(default).__name__}, "
                              f"got {value!r}")
        if isinstance(value, int | float):
            # NaN and infinities pass naive range checks; each number has its range.
            _in_range(value, f"[{name}] {key}", f"{name}.{key}")
        values[key] = value
    return cls(**values)


def _window(value, where: str) -> str | None:
    """A budget window as the ledger takes it ("" in the file: None, never resets)."""
    window = None if value == "" else value
    try:
        window_seconds(window)
    except ValueError as e:
        raise ConfigError(f"{where}: {e} (or \"\" for none), got {value!r}") from None
    return window


def _bus(raw, home: Path) -> BusSettings:
    bus = _section(BusSettings, raw, "bus")
    tcp = []
    for key in ("bus", "events_in", "events_live"):
        value = getattr(bus, key)
        if value and not (value.startswith("ipc://") or value.startswith("tcp://")):
            raise ConfigError(f"[bus] {key}: must be an ipc:// or tcp:// endpoint, got "
                              f"{value!r}")
        if value.startswith("tcp://"):
            tcp.append(key)
    if not isinstance(bus.insecure_tcp, bool):
        raise ConfigError(f"[bus] insecure_tcp: expected true or false, got "
                          f"{bus.insecure_tcp!r}")
    if tcp and not bus.insecure_tcp and not locate.suite_key_path(home).exists():
        raise ConfigError(f"[bus] {', '.join(tcp)} on tcp without keys: make the suite's "
                          "key pair with `cortex keys make`, or set insecure_tcp = true to "
                          "serve anyone who reaches the port in plaintext")
    return bus


PROVIDER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def key_file_problem(path: Path) -> str | None:
    """Why a key file may not be used (others may read it, or it is no regular file)."""
    try:
        info = path.stat()
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if not path.is_file():
        return f"{path} is not a regular file"
    if info.st_mode & 0o077:
        return (f"{path} is readable or writable by others (mode {info.st_mode & 0o777:o}): "
                "chmod 600 it")
    return None


def _provider(name: str, raw, home: Path) -> ProviderSettings:
    where = f"[providers.{name}]"
    if not PROVIDER_NAME.fullmatch(name):
        raise ConfigError(f"{where}: a provider name is 1-64 letters, digits, '_', '.' or '-'")
    raw = _table(raw, where)
    if "name" in raw:
        raise ConfigError(f"{where}: unknown key(s) name (the table's name is the provider's)")
    spec = _section(ProviderSettings, {**raw, "name": name}, f"providers.{name}")
    if not spec.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where} base_url: must be an http:// or https:// URL")
    if spec.api_key_env and spec.api_key_file:
        raise ConfigError(f"{where}: give api_key_env or api_key_file, not both")
    if spec.api_key_env and not ENV_NAME.fullmatch(spec.api_key_env):
        raise ConfigError(f"{where} api_key_env: the name of an environment variable, "
                          f"got {spec.api_key_env!r}")
    key_file = spec.api_key_file
    if key_file:
        path = Path(os.path.expanduser(key_file))
        key_file = str(path if path.is_absolute() else home / path)
        problem = key_file_problem(Path(key_file)) if Path(key_file).exists() else None
        if problem:
            raise ConfigError(f"{where} api_key_file: {problem}")
    if spec.window <= 0 or spec.timeout <= 0:
        raise ConfigError(f"{where}: window and timeout must be positive")
    return ProviderSettings(**{**spec.__dict__, "base_url": spec.base_url.rstrip("/"),
                               "api_key_file": key_file})


def load(home: Path) -> Settings:
    """Load `<home>/cortex.toml` (missing file: all defaults)."""
    path = home / "cortex.toml"
    raw: dict = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: "
                              f"{e.object[e.start:e.start + 1]!r})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    allowed = {"suite", "bus", "scheduler", "ledger", "pool", "handlers", "events", "routing",
               "providers", "dashboard", "types"}
    if set(raw) - allowed:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(set(raw) - allowed))}")
    suite = _section(SuiteSettings, raw.get("suite", {}), "suite")
    if suite.fsync not in FSYNC_POLICIES:
        raise ConfigError(f"[suite] fsync: must be one of {', '.join(FSYNC_POLICIES)}")
    if suite.heartbeat_interval <= 0:
        raise ConfigError("[suite] heartbeat_interval: must be positive")
    if suite.heartbeat_interval * suite.quiet_heartbeat_every * 1000 > wire.MAX_BEAT_SPACING_MS:
        raise ConfigError("[suite] quiet_heartbeat_every: heartbeat_interval times it must "
                          f"be at most {wire.MAX_BEAT_SPACING_MS // 1000} s")
    ledger_raw = dict(_table(raw.get("ledger", {}), "ledger"))
    sub = _table(ledger_raw.pop("budgets", {}), "ledger.budgets")
    ledger = _section(LedgerSettings, ledger_raw, "ledger")
    budgets = {"global": {"limit": ledger.budget,
                          "window": _window(ledger.window, "[ledger] window")}}
    for scope, spec in sub.items():
        if not (scope.startswith("type:") or scope.startswith("agent:")) or not isinstance(
                spec, dict) or set(spec) - {"limit", "window"}:
            raise ConfigError(f"[ledger.budgets.{scope}]: scope must be 'type:X' or 'agent:X' "
                              "with keys limit and window")
        limit = spec.get("limit")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"[ledger.budgets.{scope}] limit: must be a non-negative integer")
        budgets[scope] = {"limit": limit,
                          "window": _window(spec.get("window", ""),
                                            f"[ledger.budgets.{scope}] window")}
    ledger = LedgerSettings(ledger.budget, ledger.window, budgets)

    handlers = dict(DEFAULT_HANDLERS)
    for task_type, spec in _table(raw.get("handlers", {}), "handlers").items():
        if isinstance(spec, str) and ":" in spec:
            # Homes made before the services became packages name the built-ins here.
            handlers[task_type] = spec.replace("cortex.services.handlers:",
                                               "cortex.services.pool.handlers:", 1)
        elif isinstance(spec, dict) and set(spec) == {"command"} and isinstance(
                spec["command"], list) and spec["command"] and all(
                isinstance(a, str) for a in spec["command"]):
            handlers[task_type] = {"command": list(spec["command"])}
        else:
            raise ConfigError(f"[handlers] {task_type}: expected 'module:function' or "
                              "{ command = [...] }")

    groups = []
    pool = _table(raw.get("pool", {"groups": {"default": {}}}), "pool")
    if set(pool) - {"groups"}:
        raise ConfigError("[pool]: only [pool.groups.NAME] tables are allowed")
    for gname, spec in _table(pool.get("groups", {}), "pool.groups").items():
        spec = _table(spec, f"pool.groups.{gname}")
        if set(spec) - {"count", "types", "max_tasks", "max_rss_mb", "max", "idle_exit"}:
            raise ConfigError(f"[pool.groups.{gname}]: unknown key(s)")
        count = spec.get("count", 20)
        types = spec.get("types", ["echo", "sleep", "simulated_agent", "fail"])
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 1000:
            raise ConfigError(f"[pool.groups.{gname}] count: must be an integer 0..1000")
        if not isinstance(types, list) or not types or not all(
                isinstance(t, str) and 0 < len(t) <= 64 for t in types):
            raise ConfigError(f"[pool.groups.{gname}] types: must be a non-empty list of "
                              f"task types (strings), got {types!r}"[:300])
        types = tuple(types)
        missing = [t for t in types if t not in handlers]
        if missing:
            raise ConfigError(f"[pool.groups.{gname}] types: no handler for {missing}")
        ceiling = spec.get("max", count + 4)
        if isinstance(ceiling, bool) or not isinstance(ceiling, int) or \
                not count <= ceiling <= 10_000:
            raise ConfigError(f"[pool.groups.{gname}] max: must be an integer from count "
                              f"to 10000, got {ceiling!r}"[:300])
        where = f"[pool.groups.{gname}]"
        groups.append(WorkerGroup(
            gname, count, types,
            _number(spec.get("max_tasks", 0), f"{where} max_tasks", integer=True),
            float(_number(spec.get("max_rss_mb", 0), f"{where} max_rss_mb")), ceiling,
            float(_number(spec.get("idle_exit", 10.0), f"{where} idle_exit"))))
    return Settings(
        home=home,
        suite=suite,
        bus=_bus(raw.get("bus", {}), home),
        scheduler=_section(SchedulerSettings, raw.get("scheduler", {}), "scheduler"),
        ledger=ledger,
        groups=tuple(groups),
        handlers=handlers,
        events=_section(EventSettings, raw.get("events", {}), "events"),
        routing=_routing(home, raw.get("routing", {})),
        providers={name: _provider(name, spec, home) for name, spec in
                   _table(raw.get("providers", {}), "providers").items()},
        dashboard=_dashboard(raw.get("dashboard", {})),
        types=_types(raw.get("types", {})),
    )


def _types(raw) -> TypesSettings:
    raw = _table(raw, "types")
    if set(raw) - {"external", "grace"}:
        raise ConfigError("[types]: only external (a list of task types) and grace")
    external = raw.get("external", [])
    if not isinstance(external, list) or not all(
            isinstance(t, str) and 0 < len(t) <= 64 for t in external):
        raise ConfigError(f"[types] external: must be a list of task types, got "
                          f"{external!r}"[:300])
    grace = raw.get("grace", 30.0)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 86400:
        raise ConfigError(f"[types] grace: must be seconds from 0 to 86400, got {grace!r}")
    return TypesSettings(tuple(external), float(grace))


def _routing(home: Path, raw) -> RoutingSettings:
    routing = _section(RoutingSettings, raw, "routing")
    if routing.min_confidence > 1:
        raise ConfigError("[routing] min_confidence: must be between 0 and 1")
    if len(routing.fallback) > 64 or routing.fallback == "auto" or "\x00" in routing.fallback:
        raise ConfigError("[routing] fallback: must be a task type (at most 64 characters, "
                          "not 'auto') or empty")
    if routing.examples:
        return replace(routing, examples=str(home / routing.examples))
    return routing



def _dashboard(raw) -> DashboardSettings:
    dashboard = _section(DashboardSettings, raw, "dashboard")
    if not isinstance(dashboard.enabled, bool):
        raise ConfigError(f"[dashboard] enabled: expected true or false, "
                          f"got {dashboard.enabled!r}")
    if not 0 <= dashboard.port <= 65535:
        raise ConfigError("[dashboard] port: must be 0 (any free port) to 65535")
    if not 0.1 <= dashboard.refresh <= 60:
        raise ConfigError("[dashboard] refresh: must be between 0.1 and 60 seconds")
    return dashboard
