"""The `covid-plugin` console script."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pydicom

from covid_plugin.config import ConfigError, Settings, load_settings
from covid_plugin.store.jobs import JobState
from covid_plugin.store.outbox import OutboxState

log = logging.getLogger("covid_plugin")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "ae_title": getattr(args, "ae_title", None),
        "port": getattr(args, "port", None),
        "data_dir": getattr(args, "data_dir", None),
        "metrics_port": getattr(args, "metrics_port", None),
        "device": getattr(args, "device", None),
        "listener_runs_jobs": False if getattr(args, "no_jobs", False) else None,
    }
    return load_settings(args.config, overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # highdicom's person-name warning and pydicom's value-validation warnings quote values
    # such as the patient's name: they must never reach a log
    warnings.filterwarnings("ignore", message=".*intended person name.*")
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE


def cmd_listen(settings: Settings, args: argparse.Namespace) -> int:
    """The listener; with `listener_runs_jobs` (the default) also the worker: one node."""
    return _serve(settings, listen=True, work=settings.listener_runs_jobs)


def cmd_work(settings: Settings, args: argparse.Namespace) -> int:
    """A worker without a listener, sharing the PostgreSQL database and the data dir."""
    if settings.database_url is None:
        print("covid-plugin: `work` needs database_url (PostgreSQL), which the listeners "
              "share; with the embedded SQLite store, `covid-plugin listen` runs the jobs",
              file=sys.stderr)
        return 2
    return _serve(settings, listen=False, work=True)


def _serve(settings: Settings, listen: bool, work: bool) -> int:
    from covid_plugin.ml.spec import ModelIntegrityError
    from covid_plugin.service import Node, PipelinesNotFound
    from covid_plugin.store.db import STORE_ERRORS
    from covid_plugin.store.lock import DataDirInUse

    try:
        node = Node(settings, listen=listen, work=work)
    except PipelinesNotFound as exc:
        print(f"covid-plugin: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except (DataDirInUse, ModelIntegrityError, OSError, *STORE_ERRORS) as exc:
        print(f"covid-plugin: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        node.start()
    except (ModelIntegrityError, OSError, *STORE_ERRORS) as exc:  # e.g. the port is taken
        print(f"covid-plugin: cannot start: {exc}", file=sys.stderr)
        return 1  # exiting releases the data dir lock
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    log.info("stopping")
    node.stop()
    return 0


class NoStore(Exception):
    """An administrator's command named a store that does not exist."""


def _shown_url(url: str) -> str:
    """A database URL without its password (the output gets pasted into tickets)."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@",
                                                                 ":***@", 1)))


def _database(settings: Settings):
    """The node's store, said on stderr. An SQLite store that does not exist is refused:
    a command run without --config would otherwise create an empty ./var/covid_plugin.sqlite
    and report that there is nothing there."""
    from covid_plugin.store.db import open_database

    if settings.database_url is None and not settings.db_path.is_file():
        raise NoStore(f"no store at {settings.db_path} (is --config or --data-dir the "
                      "node's?)")
    where = settings.database_url and _shown_url(settings.database_url)
    print(f"store: {where or settings.db_path}", file=sys.stderr)
    return open_database(settings.database_url, settings.db_path)


def cmd_jobs(settings: Settings, args: argparse.Namespace) -> int:
    from covid_plugin.store.jobs import JobQueue

    for job in JobQueue(_database(settings)).all():
        if args.state and job.state != args.state:
            continue
        worker = f"worker={job.lease_owner} " if job.state == JobState.RUNNING else ""
        print(f"{job.id:6d}  {job.state:11s} tries={job.attempts} {job.modality:3s} "
              f"{job.calling_ae:16s} {job.series_uid}  {worker}{job.reason or ''}")
    return 0


def cmd_requeue(settings: Settings, args: argparse.Namespace) -> int:
    """Give quarantined or failed jobs a fresh set of attempts."""
    from covid_plugin.store.jobs import JobQueue

    n = JobQueue(_database(settings)).requeue(args.ids)
    print(f"{n} job(s) queued again")
    return 0 if n else 1


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    """Apply the retention policy now (or, with --dry-run, say what it would remove)."""
    from covid_plugin.store.retention import purge

    print(purge(settings, _database(settings), dry_run=args.dry_run).summary())
    return 0


def _outbox(settings: Settings, db=None):
    from covid_plugin.store.outbox import Outbox

    return Outbox.from_settings(db or _database(settings), settings.outbox)


def cmd_outbox(settings: Settings, args: argparse.Namespace) -> int:
    for item in _outbox(settings).list(args.state):
        print(f"{item.id:6d}  {item.state:7s} tries={item.attempts} job={item.job_id} "
              f"{item.destination} {item.sop_instance_uid}  "
              f"{item.last_error or ''}")
    return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    if not args.ids and not args.all:
        print("name outbox item ids, or --all for every dead item", file=sys.stderr)
        return 2
    n = _outbox(settings).retry(None if args.all else args.ids)
    print(f"{n} dead item(s) queued again")
    return 0


def _health_tls(settings: Settings):
    """The node's own certificate as the health check's client identity.

    The check connects to this node on this machine, so it does not verify the server's
    certificate; it presents the node's certificate, which a node that requires client
    certificates signed by `tls.ca_file` must accept (use a certificate that CA signed).
    """
    import ssl

    if not settings.tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(settings.tls.cert_file), str(settings.tls.key_file))
    return ctx


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """Checks the store and the listener (C-ECHO) from outside the running node: over TLS
    when the node requires it, as `health_ae_title`, which the allow list always admits."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from covid_plugin.health import attention, problems_and_warnings
    from covid_plugin.observability import operations_health
    from covid_plugin.store.associations import Associations
    from covid_plugin.store.jobs import JobQueue

    report: dict = {"ae_title": settings.ae_title}
    try:
        db = _database(settings)  # one connection (and one schema check) for the report
        jobs, outbox = JobQueue(db), _outbox(settings, db)
        report["jobs"] = jobs.counts()
        report["outbox"] = outbox.counts()
        report["store"] = True
        report.update(operations_health(
            settings.data_dir, settings.storage,
            [j.id for j in jobs.stuck(settings.jobs.stuck_after_s)], [], outbox.backlog()))
        associations = Associations(db, "health", settings.cluster.listener_stale_after_s)
        problems, report["warnings"] = problems_and_warnings(
            settings, attention(settings, jobs, outbox, associations))
        report["problems"] += problems
    except Exception as exc:  # report the failure, as a health check must
        report["store"] = False
        report["store_error"] = str(exc)
    ae = AE(ae_title=settings.health_ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host,
                                                                       settings.host)
    ssl_context = _health_tls(settings)
    tls_args = (ssl_context, host) if ssl_context is not None else None
    assoc = ae.associate(host, settings.port, ae_title=settings.ae_title, tls_args=tls_args)
    report["echo"] = False
    report["tls"] = tls_args is not None
    if assoc.is_established:
        status = assoc.send_c_echo()
        report["echo"] = getattr(status, "Status", None) == 0
        assoc.release()
    report["ok"] = report["store"] and report["echo"] and not report.get("problems")
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def cmd_config(settings: Settings, args: argparse.Namespace) -> int:
    """The effective configuration: embedded defaults, then the file, environment and flags;
    the database password is not printed (the output gets pasted into tickets)."""
    shown = settings.model_dump(mode="json")
    if settings.database_url:
        shown["database_url"] = _shown_url(settings.database_url)
    print(json.dumps(shown, indent=2))
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from covid_plugin.oneshot import run_folder
    from covid_plugin.summary import format_table

    rows = run_folder(args.folder, args.out, settings)
    print(format_table(rows))
    return 0 if all(row.outcome != "failed" for row in rows) else 1


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    import tempfile

    from covid_plugin.demo import REPO, run_demo

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="covid-plugin-demo-"))
    return run_demo(args.samples or REPO / "dicom_samples", workdir)


CONFIG_HELP = "TOML or JSON config file (env COVID_PLUGIN_CONFIG)"


def build_parser() -> argparse.ArgumentParser:
    """`--config` is accepted before and after the command (`covid-plugin listen --config
    node.toml` as the README writes it, and `covid-plugin --config node.toml listen`)."""
    parser = argparse.ArgumentParser(prog="covid-plugin", description=__doc__)
    parser.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without --config keeps the value given before it
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    listen = sub.add_parser("listen", parents=[common],
                            help="run the DICOM node (listener, and jobs unless --no-jobs)")
    listen.add_argument("--ae-title")
    listen.add_argument("--port", type=int)
    listen.add_argument("--data-dir", type=Path)
    listen.add_argument("--metrics-port", type=int)
    listen.add_argument("--no-jobs", action="store_true",
                        help="listen only; `covid-plugin work` processes run the jobs "
                             "(needs database_url)")
    listen.set_defaults(func=cmd_listen)

    work = sub.add_parser("work", parents=[common],
                          help="run jobs and send results, without a listener (needs "
                               "database_url)")
    work.add_argument("--data-dir", type=Path)
    work.add_argument("--metrics-port", type=int)
    work.add_argument("--device", help='where models run: "auto", "cpu", "cuda" or "cuda:N"')
    work.set_defaults(func=cmd_work)

    run = sub.add_parser("run", parents=[common],
                         help="run the pipelines on a folder of DICOM files")
    run.add_argument("folder", type=Path)
    run.add_argument("--out", type=Path, required=True)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", parents=[common],
                          help="node + local PACS peer + dicom_samples/, end to end")
    demo.add_argument("--samples", type=Path, help="default: dicom_samples/")
    demo.add_argument("--workdir", type=Path, help="default: a new temporary folder")
    demo.set_defaults(func=cmd_demo)

    jobs = sub.add_parser("jobs", parents=[common], help="list jobs and their states")
    jobs.add_argument("--state", choices=[state.value for state in JobState])
    jobs.add_argument("--data-dir", type=Path)
    jobs.set_defaults(func=cmd_jobs)

    requeue = sub.add_parser("requeue", parents=[common],
                             help="run quarantined or failed jobs again")
    requeue.add_argument("ids", nargs="+", type=int)
    requeue.add_argument("--data-dir", type=Path)
    requeue.set_defaults(func=cmd_requeue)

    purge = sub.add_parser("purge", parents=[common],
                           help="remove what the retention policy says has expired")
    purge.add_argument("--dry-run", action="store_true", help="only say what would go")
    purge.add_argument("--data-dir", type=Path)
    purge.set_defaults(func=cmd_purge)

    outbox = sub.add_parser("outbox", parents=[common], help="list outbox items")
    outbox.add_argument("--state", choices=[state.value for state in OutboxState])
    outbox.add_argument("--data-dir", type=Path)
    outbox.set_defaults(func=cmd_outbox)

    retry = sub.add_parser("retry", parents=[common], help="re-send dead outbox items")
    retry.add_argument("ids", nargs="*", type=int)
    retry.add_argument("--all", action="store_true")
    retry.add_argument("--data-dir", type=Path)
    retry.set_defaults(func=cmd_retry)

    health = sub.add_parser("health", parents=[common],
                            help="check the store and C-ECHO the node")
    health.add_argument("--port", type=int)
    health.add_argument("--data-dir", type=Path)
    health.set_defaults(func=cmd_health)

    config = sub.add_parser("config", parents=[common],
                            help="print the effective configuration (defaults included)")
    config.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"covid-plugin: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.log_level)
    try:
        return args.func(settings, args)
    except NoStore as exc:
        print(f"covid-plugin: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
