"""One typed configuration: embedded defaults, then a TOML/JSON file, then COVID_PLUGIN_*
environment variables, then command-line flags; validated once at start so that a bad value
stops the node with a message naming the key, not a traceback an hour later on the first study.

pydantic-settings reads the file and the environment and merges them (`load_settings`);
`Settings(...)` built in code holds only what it is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from ipaddress import ip_address
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "COVID_PLUGIN_"
ENV_NESTED_DELIMITER = "__"  # COVID_PLUGIN_TLS__ENABLED=true sets tls.enabled
# COVID_PLUGIN_* variables that are not settings: the config file's path, and where the tests
# and training find the shared data set
CONFIG_VARIABLE = ENV_PREFIX + "CONFIG"
NOT_SETTINGS = {CONFIG_VARIABLE, ENV_PREFIX + "DATA"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _readable(path: Path | None, what: str) -> None:
    if path is not None and not path.is_file():
        raise ValueError(f"{what} {path} is not a readable file")


class PeerTls(_Strict):
    """TLS towards one destination: verify its certificate, present ours if it asks for one."""

    ca_file: Path | None = None  # CA that signed the destination's certificate; None: system CAs
    cert_file: Path | None = None  # our client certificate (PEM), when the destination wants one
    key_file: Path | None = None
    server_name: str | None = None  # name in the destination's certificate; default: its host
    check_hostname: bool = True

    @model_validator(mode="after")
    def _files(self) -> PeerTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (the client certificate)")
        for path, what in ((self.ca_file, "ca_file"), (self.cert_file, "cert_file"),
                           (self.key_file, "key_file")):
            _readable(path, what)
        return self


class Peer(_Strict):
    """A DICOM node we send results to."""

    kind: Literal["dicom"] = "dicom"  # C-STORE; the default kind of a destination
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    tls: PeerTls | None = None  # set: results go to this peer over TLS only


class DicomwebDestination(_Strict):
    """A DICOMweb server we send results to by STOW-RS (covid_plugin/node/stow.py), e.g. a
    PACS's or a VNA's /dicom-web root. Deliveries go through the same outbox as C-STORE."""

    kind: Literal["dicomweb"]
    url: str  # the service root; results are POSTed to {url}/studies
    headers: dict[str, str] = {}  # e.g. {"Authorization": "Bearer ..."}; never logged
    verify_tls: bool = True  # check the server's certificate (https)
    ca_file: Path | None = None  # trust this CA bundle instead of the system's
    cert_file: Path | None = None  # client certificate, for servers that ask for one
    key_file: Path | None = None
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials (they would reach logs): use headers")
        return value.rstrip("/")


def _destination_kind(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return "dicomweb" if kind == "dicomweb" else "dicom"


# a [[destinations]] entry: a DICOM peer (C-STORE), or kind = "dicomweb" (STOW-RS)
Destination = Annotated[
    Annotated[Peer, Tag("dicom")] | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


class TlsSettings(_Strict):
    """TLS for the listener: a server certificate, and optionally required client certificates."""

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None  # when set, clients must present a certificate signed by it

    @model_validator(mode="after")
    def _files(self) -> TlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("enabled = true needs cert_file and key_file")
        if self.enabled:
            for path, what in ((self.cert_file, "cert_file"), (self.key_file, "key_file"),
                               (self.ca_file, "ca_file")):
                _readable(path, what)
        return self


class NetworkSettings(_Strict):
    """Bounds on what one connection may hold, so that no client can freeze the listener.

    Every connection's TLS handshake, association request and idle time are timed; a peer
    address may hold only part of the association slots.
    """

    tls_handshake_timeout_s: float = Field(default=10.0, gt=0)
    acse_timeout_s: float = Field(default=15.0, gt=0)  # connect -> association request/release
    idle_timeout_s: float = Field(default=60.0, gt=0)  # nothing received: association aborted
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    max_associations: int = Field(default=32, ge=1)
    max_associations_per_peer: int = Field(default=16, ge=1)  # per remote IP address
    # several `covid-plugin listen` processes on this machine share `port` (SO_REUSEPORT): the
    # kernel spreads new connections over them. Every one of them must set it
    reuse_port: bool = False


class StorageLimits(_Strict):
    """When the listener stops taking data, before the disk is full or memory runs out."""

    min_free_percent: float = Field(default=10.0, ge=0, lt=100)  # of the data dir's file system
    min_free_mb: float = Field(default=1024.0, ge=0)
    max_instance_mb: float = Field(default=256.0, gt=0)


class SelectionSettings(_Strict):
    """Which completed series become jobs; everything else is recorded as rejected, with why."""

    modalities: list[str] = ["CR", "DX", "CT"]
    chest_keywords: list[str] = ["CHEST", "THORAX", "LUNG", "THX", "PULM", "TORAX", "THORAKS"]
    accept_unknown_body_part: bool = True  # many CT series carry no BodyPartExamined
    min_ct_slices: int = Field(default=20, ge=2)


class OutboxSettings(_Strict):
    """How hard we try to deliver a result before it goes to the dead letter state.

    A PACS down for a maintenance window or a night must not cost results: failed deliveries
    are retried with a capped backoff until the result is `dead_after_s` old, and only then
    go dead (until `covid-plugin retry`). `max_attempts` optionally caps the tries as well.
    """

    max_attempts: int | None = Field(default=None, ge=1)  # None: no cap on the number of tries
    dead_after_s: float = Field(default=86400.0, gt=0)  # a result this old that fails is dead
    backoff_base_s: float = Field(default=2.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    poll_interval_s: float = Field(default=0.5, gt=0)


class JobSettings(_Strict):
    """How often a job is tried, and how long a series may wait for a sender that broke off."""

    # a job claimed this many times without an outcome (the process died: out of memory, a
    # crash) or failed for lack of disk this many times is quarantined, not tried again
    max_attempts: int = Field(default=3, ge=1)
    # a job put back because the node ran out of disk waits this long before the next try
    retry_after_s: float = Field(default=60.0, gt=0)
    # a series whose last association was aborted (or cut by a node restart) waits this long
    # for the sender to send it again, then is recorded as incomplete and not processed
    incomplete_timeout_s: float = Field(default=3600.0, gt=0)
    # health reports a job 'running' for longer than this as stuck
    stuck_after_s: float = Field(default=1800.0, gt=0)


HealthCheck = Literal["dead_results", "no_worker", "overdue_series", "held_series",
                      "incomplete_series", "quarantined_jobs"]


class HealthSettings(_Strict):
    """What `covid-plugin health` and /health fail on besides the store, disk and listener
    (covid_plugin/health.py): each check names the series or jobs it found."""

    warn_only: list[HealthCheck] = []  # these are reported as warnings; health stays ok
    # a series complete (quiet, released) but not queued this long after its quiet period
    overdue_after_s: float = Field(default=300.0, gt=0)


class RetentionSettings(_Strict):
    """How long the node keeps what it holds; null keeps it for ever. Applied every
    `interval_s` by the running node, and on demand by `covid-plugin purge`."""

    spool_days: float | None = Field(default=7.0, ge=0)  # received instances of ended jobs
    rejected_days: float | None = Field(default=7.0, ge=0)  # refused instances (patient data)
    results_days: float | None = Field(default=7.0, ge=0)  # result files no longer to be sent
    db_days: float | None = Field(default=90.0, ge=0)  # rows of ended jobs and their outbox
    # a size cap on spool + rejected + results together: past it, the oldest removable
    # files go first, whatever their age
    max_total_gb: float | None = Field(default=None, gt=0)
    interval_s: float = Field(default=3600.0, gt=0)


class ClusterSettings(_Strict):
    """How processes that share one PostgreSQL database tell each other they are alive.

    A listener renews its heartbeat every `heartbeat_s`; one silent for `listener_stale_after_s`
    is taken for dead, and its open associations end as interrupted (their series wait to be
    resent). A worker holds each job it runs under a lease it renews every `heartbeat_s`; when
    the worker dies, another takes the job once `job_lease_s` has passed, up to
    jobs.max_attempts. An outbox item being sent is leased the same way for `outbox_lease_s`.
    Shorter leases recover sooner and cost more database writes.
    """

    heartbeat_s: float = Field(default=5.0, gt=0)
    listener_stale_after_s: float = Field(default=30.0, gt=0)
    job_lease_s: float = Field(default=60.0, gt=0)
    outbox_lease_s: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _heartbeat_inside_leases(self) -> ClusterSettings:
        for name in ("listener_stale_after_s", "job_lease_s", "outbox_lease_s"):
            if getattr(self, name) < 2 * self.heartbeat_s:
                raise ValueError(f"{name} must be at least twice heartbeat_s, or a live "
                                 "process loses its lease between two heartbeats")
        return self


class CtSettings(_Strict):
    """Chest CT inference (the lesion network runs on `device`, slice batches of this size)."""

    batch_size: int = Field(default=4, ge=1, le=512)  # larger batches pay off on a GPU


class CxrPopulationSettings(_Strict):
    """Whom the chest X-ray model was validated on; other patients get no call, only a reason.

    The classifier is built, calibrated and judged on adults, so children are declined by
    default. A film whose age cannot be read is analysed by default (`unknown_age`): many
    de-identified or ICU films carry no age, and the training COVID films are adult hospital
    patients without a recorded age; "decline" is the strict choice for sites that always
    send one.
    """

    min_age_years: float | None = Field(default=18, ge=0)
    max_age_years: float | None = Field(default=None, ge=0)
    unknown_age: Literal["analyse", "decline"] = "analyse"


class Settings(BaseSettings):
    """Everything the node reads at start."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_parse_none_str="null",  # COVID_PLUGIN_METRICS_PORT=null: back to None
    )

    ae_title: str = Field(default="COVID_PLUGIN", min_length=1, max_length=16)
    host: str = "127.0.0.1"  # this machine only; "0.0.0.0" (all interfaces) is a choice
    port: int = Field(default=11112, ge=0, le=65535)
    data_dir: Path = Path("var")
    allowed_callers: list[str] = []  # the PACS AE titles that may send
    accept_any_caller: bool = False  # needed (true) to listen beyond loopback with no list
    check_called_ae: bool = True  # refuse associations addressed to another AE title
    health_ae_title: str = Field(default="COVID_HEALTH", min_length=1, max_length=16)
    unsupported_sop_classes: Literal["refuse", "discard"] = "refuse"
    max_pdu: int = Field(default=4 * 1024 * 1024, ge=0)
    tls: TlsSettings = TlsSettings()
    network: NetworkSettings = NetworkSettings()
    storage: StorageLimits = StorageLimits()
    quiet_period_s: float = Field(default=10.0, ge=0)
    selection: SelectionSettings = SelectionSettings()
    # calling AE title -> where its results go back ("return address"); used when no
    # destination is configured for all results. Matched without regard to case
    # (`return_address`): an environment variable's name cannot keep it
    return_addresses: dict[str, Peer] = {}
    destinations: list[Destination] = []
    outbox: OutboxSettings = OutboxSettings()
    jobs: JobSettings = JobSettings()
    retention: RetentionSettings = RetentionSettings()
    health: HealthSettings = HealthSettings()
    # send a short "not analysed" SR for a series a pipeline declines (lateral film, no lungs,
    # outside the validated population), so the reader knows the AI looked (IHE AI Results)
    declined_reports: bool = True
    models_dir: Path = Path(__file__).resolve().parent.parent / "models"
    pipelines: str = Field(default="covid_plugin.pipelines:default_pipelines",
                           pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    # where models run: "auto" (a GPU when torch sees one), "cpu", "cuda" or "cuda:N" to pin a
    # worker to one GPU of several
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # None: the embedded SQLite file in data_dir, for one process. A postgresql:// URL lets
    # several listeners and workers share one database (README, "Running several nodes")
    database_url: str | None = None
    # `covid-plugin listen` also runs jobs and sends results (the all-in-one node); false makes
    # it a listener only, for sites that run `covid-plugin work` processes beside it
    listener_runs_jobs: bool = True
    cluster: ClusterSettings = ClusterSettings()
    ct: CtSettings = CtSettings()
    cxr_population: CxrPopulationSettings = CxrPopulationSettings()
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 to let a Prometheus on another host scrape
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    @field_validator("ae_title", "health_ae_title")
    @classmethod
    def _ae_title_is_ascii(cls, value: str) -> str:
        if not value.isascii() or "\\" in value:
            raise ValueError("AE title must be ASCII without backslash")
        return value.strip()

    @field_validator("allowed_callers")
    @classmethod
    def _strip_callers(cls, value: list[str]) -> list[str]:
        return [v.strip() for v in value]

    @field_validator("return_addresses")
    @classmethod
    def _one_address_per_caller(cls, value: dict[str, Peer]) -> dict[str, Peer]:
        callers = [ae.strip().casefold() for ae in value]
        twice = sorted({ae for ae in callers if callers.count(ae) > 1})
        if twice:
            raise ValueError(f"more than one return address for {', '.join(twice)} "
                             "(calling AE titles are matched without regard to case)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must be a postgresql:// URL (leave it unset for the embedded "
                             "SQLite store)")
        return value

    @model_validator(mode="after")
    def _jobs_need_a_worker(self) -> Settings:
        if not self.listener_runs_jobs and self.database_url is None:
            raise ValueError("listener_runs_jobs = false needs database_url: `covid-plugin "
                             "work` processes share a PostgreSQL database with the listener")
        return self

    @model_validator(mode="after")
    def _open_node_needs_a_caller_list(self) -> Settings:
        """Listening beyond this machine with no allow list is a choice the admin writes down."""
        if not self.allowed_callers and not self.accept_any_caller and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host} is reachable from other machines and allowed_callers is "
                "empty: list the PACS AE titles in allowed_callers, or set "
                "accept_any_caller = true to accept any calling AE title")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the arguments: `Settings(...)` in the demo and the tests must not pick up a
        COVID_PLUGIN_DATABASE_URL or port from the shell; `load_settings` adds the environment
        and the file, for the processes an administrator starts."""
        return (init_settings,)

    def return_address(self, calling_ae: str) -> Peer | None:
        """Where the results of `calling_ae`'s studies go back, if it has a return address."""
        wanted = calling_ae.strip().casefold()
        return next((peer for ae, peer in self.return_addresses.items()
                     if ae.strip().casefold() == wanted), None)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "covid_plugin.sqlite"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


class EnvironmentVariables(EnvSettingsSource):
    """COVID_PLUGIN_* variables from a given mapping (the tests pass one), where a name under
    the prefix that is no setting is an error, as an unknown key in the file is: a misspelt
    COVID_PLUGIN_AE_TITEL must stop the node, not leave the default in place unnoticed."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env_vars = parse_env_vars(environ, self.case_sensitive, self.env_ignore_empty,
                                       self.env_parse_none_str)

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        prefix = self.env_prefix.lower()
        not_settings = {name.lower() for name in NOT_SETTINGS}
        for name, value in self.env_vars.items():
            if not name.startswith(prefix) or name in not_settings:
                continue
            key = name[len(prefix):]
            if key.partition(ENV_NESTED_DELIMITER)[0] not in data:
                data[key] = value  # validation rejects it as an extra input, by name
        return data


def _file_source(path: Path) -> PydanticBaseSettingsSource:
    """The config file, TOML or (by its suffix) JSON; a missing file is an error here, where
    pydantic-settings would skip it: the node must not start on defaults by a typo."""
    if not path.is_file():
        raise ConfigError(f"config file {path}: not a readable file")
    try:
        if path.suffix == ".json":
            return JsonConfigSettingsSource(Settings, json_file=path)
        return TomlConfigSettingsSource(Settings, toml_file=path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc


def load_settings(
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build Settings from file, environment and flags (later ones win; nested keys merge).

    `environ` defaults to this process's environment; the file is `config_file`, else the one
    COVID_PLUGIN_CONFIG names. Flags left at None (not given) do not count.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(CONFIG_VARIABLE):
        config_file = Path(environ[CONFIG_VARIABLE])
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    file = () if config_file is None else (_file_source(config_file),)
    # the first source that holds a key wins; tables merge key by key; then the defaults
    sources = (InitSettingsSource(Settings, flags), EnvironmentVariables(Settings, environ), *file)
    try:
        return Settings(_build_sources=(sources, flags))
    except SettingsError as exc:  # a list or table in the environment that is not JSON
        raise ConfigError(f"invalid configuration: {exc} (lists and tables are written as "
                          "JSON)") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
