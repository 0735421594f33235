"""The `bench` command: a thin layer over the harness, the store, sweeps and reports.

Mistakes a user can make end with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from bench.errors import BenchError, Interrupted, RunFailed, one_line
from bench.redact import redact


class Parser(argparse.ArgumentParser):
    """argparse, but its usage errors are one line like every other user error."""

    def error(self, message):
        raise BenchError(f"{self.prog}: {message}")


class ModelHelp(argparse.Action):
    """`bench train MODEL --help`: the usual help, then MODEL's hyper-parameters (bench.config.parameter_table)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0,
                         help="show this help, and with a model its hyper-parameters, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        model = getattr(namespace, "model", None)
        if model:
            print_parameters(model)
        parser.exit()


def print_parameters(model: str) -> None:
    from bench.config import parameter_table

    rows = [{**row, "default": "" if row["default"] == "" else str(row["default"])} for row in parameter_table(model)]
    columns = ("key", "type", "allowed", "default", "meaning")
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns[:-1]}
    print(f"\nhyper-parameters of {model} (--set KEY=VALUE; the defaults are `bench train`'s):")
    for row in [dict(zip(columns, columns)), *rows]:
        print("  " + "  ".join(row[c].ljust(widths[c]) for c in columns[:-1]) + "  " + row["meaning"])


def progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they show only when the output is a terminal)")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars on a terminal only: redirected to a log, a bar's redraws filled a PTB sweep's log with 20k
    lines an epoch; without bars a run prints one line an epoch."""
    return not args.no_progress and sys.stdout.isatty()


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder holding the corpora (default: $BENCH_DATA_DIR, else shared/data "
                                           "beside the checkout, else a per-user cache folder)")
    parser.add_argument("--storage", help="Optuna storage URL of the results database "
                                          "(default: sqlite:///bench.db in the working directory)")
    progress_option(parser)
    run_folder_options(parser)


def run_folder_options(parser: argparse.ArgumentParser) -> None:
    # absolute from the start (argparse converts the default too): a trial requeued on a worker started
    # elsewhere finds its folder, and the record names it
    parser.add_argument("--run-dir", type=lambda text: Path(text).resolve(), default="runs",
                        help="folder of the runs' checkpoints, one subfolder per study and run (default: ./runs, "
                             "made absolute at start)")
    parser.add_argument("--keep", choices=("best", "last", "all", "none"), default="best",
                        help="checkpoints a finished run keeps (default: best)")


def build_parser() -> Parser:
    parser = Parser(prog="bench", description="Language-model benchmark suite (Mikolov et al. 2011 and beyond).")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also given after "
                                                             "the command)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add_command in (add_train, add_run, add_sweep, add_report, add_regress):
        add_command(commands)
    return parser


def add_train(commands) -> None:
    from bench.corpora import CORPORA
    from bench.models.plugins import model_names

    train = commands.add_parser("train", help="train and evaluate one model, print and store its record",
                                add_help=False)
    train.add_argument("-h", "--help", action=ModelHelp)
    train.add_argument("model", help=f"one of: {', '.join(model_names())}; or a plugin class as "
                                     "module.path:ClassName")
    train.add_argument("--corpus", default="synthetic", help=f"one of: {', '.join(CORPORA)} (default: synthetic)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a hyper-parameter (repeatable), e.g. --set hidden_size=200")
    train.add_argument("--resume", action="store_true", help="go on from the last completed epoch of an "
                                                             "interrupted run of the same configuration")
    train.add_argument("--seeds", type=int, default=1, help="runs of seeds seed, seed+1, ... (default: 1), each "
                                                            "stored")
    common_options(train)


def add_run(commands) -> None:
    run = commands.add_parser("run", help="the quick suite: every model on a corpus, one comparison table")
    run.add_argument("--corpus", default="synthetic", help="corpus (default: synthetic, needs no download)")
    run.add_argument("--models", nargs="+", help="only these models (default: all that take the corpus, "
                                                 "installed plugins included)")
    run.add_argument("--seeds", type=int, default=1, help="runs of each model with seeds 0, 1, ... (default: 1)")
    common_options(run)


def add_sweep(commands) -> None:
    sweep = commands.add_parser("sweep", help="an Optuna study over a spec (sweeps/*.yaml): trials stored as runs, "
                                              "one W&B run each; re-running resumes it")
    sweep.add_argument("spec", help="the sweep spec, e.g. sweeps/rnn-bptt-synthetic.yaml")
    sweep.add_argument("--trials", type=int, help="trials the study holds in total, not more (default: the spec's)")
    sweep.add_argument("--storage", help="Optuna storage URL (default: sqlite:///bench.db, the results database); "
                                         "journal:PATH for several processes on one machine, "
                                         "postgresql+psycopg://USER:PASSWORD@HOST/DB for several machines (start "
                                         "the same command on each)")
    sweep.add_argument("--n-jobs", type=int, default=1, help="worker processes on this machine (default: 1); with "
                                                           "GPUs, worker i sees GPU i alone (round-robin)")
    sweep.add_argument("--max-retry", type=int, help="times a trial whose worker died (killed, out of memory) is "
                                                     "run again, then failed (default: the spec's max_retry, else 2)")
    sweep.add_argument("--no-wandb", action="store_true", help="log nothing to W&B (also: WANDB_MODE=disabled); "
                                                               "without a W&B login runs are kept offline")
    sweep.add_argument("--data-dir", help="folder holding the corpora (default: $BENCH_DATA_DIR, else shared/data "
                                          "beside the checkout, else a per-user cache folder)")
    progress_option(sweep)
    run_folder_options(sweep)


def add_report(commands) -> None:
    report = commands.add_parser("report", help="tables, plots, Markdown/HTML/CSV and a W&B report of the results")
    report.add_argument("--storage", help="Optuna storage URL of the results database (default: sqlite:///bench.db)")
    report.add_argument("--study", nargs="+", action="extend", dest="studies", metavar="NAME",
                        help="only these studies (default: every study in the storage)")
    report.add_argument("--out", default="reports/latest", help="output folder (default: reports/latest)")
    report.add_argument("--project", help="W&B project (default: $WANDB_PROJECT, else bench)")
    report.add_argument("--no-wandb", action="store_true", help="write the files only, log nothing to W&B")
    report.add_argument("--readme", metavar="FILE", help="also write Tables 2 and 3 into FILE, between its lines "
                        "<!-- bench report --readme: start --> and <!-- bench report --readme: end -->")


def add_regress(commands) -> None:
    from bench.regress import MIN_TIMED_SECONDS, QUALITY_BATCHES

    regress = commands.add_parser("regress", help="re-run the fixed regression set and compare it with the baseline "
                                                  "(exit 1 on a regression)")
    regress.add_argument("--baseline", default="reports/baseline.json",
                         help="baseline JSON (default: reports/baseline.json)")
    regress.add_argument("--update", action="store_true", help="rewrite the baseline from this run")
    regress.add_argument("--models", nargs="+", help="only these models (default: every model of the registry)")
    regress.add_argument("--out", default="reports/regress",
                         help="folder of result.json and summary.md (default: reports/regress)")
    regress.add_argument("--batches", type=int, default=QUALITY_BATCHES,
                         help=f"training batches per epoch of the synthetic runs (default: {QUALITY_BATCHES}; the "
                              "baseline must have been made with the same)")
    regress.add_argument("--repeats", type=int, default=3, help="timed repetitions per model, median taken "
                                                                "(default: 3)")
    regress.add_argument("--speed-seconds", type=float, default=MIN_TIMED_SECONDS,
                         help=f"CPU seconds of training steps timed per repetition (default: {MIN_TIMED_SECONDS})")
    regress.add_argument("--data-dir", help="folder holding the corpora; with PTB there, a PTB slice is added")


def run_and_store(config: dict, storage, study: str, **options) -> dict | None:
    """run_experiment, its record stored in `study`; a run that raises or diverges is stored as a failed trial
    with its reason and raises RunFailed. A user error (BenchError) stores nothing. A DDP run's worker
    process stores nothing and returns None: rank 0 stores the run."""
    from bench.harness import is_worker_process, run_experiment
    from bench.models.plugins import model_spec
    from bench.store import save_failure, save_record

    metric = model_spec(config["model"]).metric
    try:
        record = run_experiment(config, **options)
    except (BenchError, RunFailed):
        raise
    except Exception as error:
        if not is_worker_process(config):
            save_failure(storage, study, metric, one_line(error), {"config": config})
        raise RunFailed(f"{config['model']} on {config['corpus']} failed: {redact(one_line(error))}; stored as "
                        f"a failed trial of study {study}") from error
    if record is not None:
        save_record(record, storage, study, metric)
    return record


def command_train(args) -> int:
    from pathlib import Path

    from bench.config import make_config, parse_assignments
    from bench.corpora import require
    from bench.records import check_writable

    config = make_config(args.model, {"corpus": args.corpus, **parse_assignments(args.set)})
    if args.seeds < 1:
        raise BenchError(f"--seeds must be positive, got {args.seeds}")
    require(config["corpus"], args.data_dir)
    check_writable(Path(args.run_dir))

    from bench.harness import check_devices, finished_record, run_folder_name
    from bench.store import open_storage
    from bench.tables import print_tables
    from bench.threads import use_threads

    quiet_libraries()
    check_devices(config)
    use_threads()
    storage = open_storage(args.storage)
    study = f"train-{args.model}-{args.corpus}"
    records, failures = [], []
    for seed in range(config["seed"], config["seed"] + args.seeds):
        seeded = {**config, "seed": seed}
        run_dir = Path(args.run_dir) / study / run_folder_name(seeded)
        record = finished_record(run_dir, seeded) if args.resume else None
        if record is not None:
            print(f"seed {seed}: finished earlier in {run_dir}; not run again", flush=True)
        else:
            try:
                record = run_and_store(seeded, storage, study, data_dir=args.data_dir, progress=show_progress(args),
                                       run_dir=run_dir, resume=args.resume, keep=args.keep)
            except RunFailed as failure:  # the other seeds still run
                print(f"bench: {failure}", file=sys.stderr, flush=True)
                failures.append(failure)
                continue
        if record is not None:  # None: a DDP worker process, whose rank 0 prints the tables
            records.append(record)
    if records:
        print_tables(records)
    return 1 if failures else 0


def command_run(args) -> int:
    from pathlib import Path

    from bench.config import TASK_CORPORA, make_config
    from bench.corpora import require
    from bench.models.plugins import model_names, model_spec
    from bench.records import check_writable

    if args.seeds < 1:
        raise BenchError(f"--seeds must be positive, got {args.seeds}")
    require(args.corpus, args.data_dir)  # first: finding a plugin's task imports it, and torch with it
    check_writable(Path(args.run_dir))
    models = args.models or [m for m in model_names() if args.corpus in TASK_CORPORA[model_spec(m).task]]
    configs = [make_config(model, {"corpus": args.corpus, "seed": seed}, quick=True)
               for model in models for seed in range(args.seeds)]

    from bench.harness import run_folder_name
    from bench.store import open_storage
    from bench.tables import print_tables
    from bench.threads import use_threads

    quiet_libraries()
    use_threads()
    storage = open_storage(args.storage)
    records, failures, finished = [], [], False
    try:
        for number, config in enumerate(configs, 1):
            print(f"[{number}/{len(configs)}] {config['model']} on {config['corpus']}"
                  + (f", seed {config['seed']}" if args.seeds > 1 else ""), flush=True)
            spec = model_spec(config["model"])  # one study per task: a study optimises one metric in one direction
            study = f"run-{args.corpus}" if spec.task == "lm" else f"run-{args.corpus}-{spec.task}"
            try:
                record = run_and_store(config, storage, study, data_dir=args.data_dir, progress=show_progress(args),
                                       run_dir=Path(args.run_dir) / study / run_folder_name(config), keep=args.keep)
            except RunFailed as failure:
                print(f"bench: {failure}", file=sys.stderr, flush=True)
                failures.append(failure)
                continue
            records.append(record)
            print_tables([record])  # each row as its model finishes
        finished = True
    finally:  # the whole table at the end, and of the runs that finished when something stopped the rest
        if records:
            done = "All" if len(records) == len(configs) else f"{len(records)} of {len(configs)}"
            print(f"\n{done if finished else f'Stopped after {len(records)} of {len(configs)}'} runs:")
            print_tables(records)
    return 1 if failures else 0


def command_report(args) -> None:
    from pathlib import Path

    from bench.reports import make_report

    quiet_libraries()
    make_report(args.storage, args.studies, Path(args.out), args.project, use_wandb=not args.no_wandb,
                readme=Path(args.readme) if args.readme else None)


def command_sweep(args) -> None:
    from pathlib import Path

    from bench.records import check_writable
    from bench.sweep_spec import load_spec
    from bench.sweeps import run_sweep

    quiet_libraries()
    spec = load_spec(args.spec)
    check_writable(Path(args.run_dir))  # before the study is created
    table = run_sweep(spec, args.trials, args.storage, args.n_jobs, args.data_dir, use_wandb=not args.no_wandb,
                      progress=show_progress(args), worker_init=quiet_libraries, run_root=Path(args.run_dir),
                      keep=args.keep, max_retry=args.max_retry)
    print(table.to_string(index=False, na_rep="", float_format="{:.4g}".format))


def command_regress(args) -> int:
    from pathlib import Path

    from bench.regress import regress

    quiet_libraries()

    return regress(Path(args.baseline), Path(args.out), args.update, args.models, args.batches, args.repeats,
                   args.speed_seconds, args.data_dir)


COMMANDS = {"train": command_train, "run": command_run, "sweep": command_sweep, "report": command_report,
            "regress": command_regress}


def quiet_libraries() -> None:
    """Keep Lightning's banners and advice out of the tables the suite prints. Called once a command has
    imported what it runs: importing Lightning sets its logger's level back to INFO."""
    import datasets
    import optuna

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("lightning.pytorch", "lightning.fabric", "datasets", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def raise_interrupted(signal_number: int, frame) -> None:
    """SIGINT and SIGTERM: stop whatever runs with Interrupted (a sweep requeues its trial on the way out).
    Further signals are ignored while the command cleans up."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    raise Interrupted(signal_number)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Run the command; the exit code: 0 done, 1 a run failed (or a bug), 2 a user error, 130/143 SIGINT/SIGTERM.
    Every ending but 0 is one line on stderr; --debug adds the traceback."""
    from bench.threads import quiet_waits

    quiet_waits()  # before anything imports torch
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # anywhere on the line, not only before the command
    argv = [*(["--debug"] if debug else []), *(a for a in argv if a != "--debug")]
    # Libraries record the process's command line (W&B stores it in every run file): no password in it.
    sys.argv = [redact(a) for a in sys.argv]
    handling_signals = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
    if handling_signals:
        for number in STOP_SIGNALS:
            signal.signal(number, raise_interrupted)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args) or 0
    except BenchError as error:
        return fail(error, debug, 2, f"bench: error: {error}")
    except (Interrupted, KeyboardInterrupt) as stop:
        number = getattr(stop, "signal_number", signal.SIGINT)
        return fail(stop, debug, 128 + number, "bench: interrupted")
    except RunFailed as error:
        return fail(error, debug, 1, f"bench: {error}")
    except Exception as error:  # a bug: still one line, the traceback under --debug
        return fail(error, debug, 1, f"bench: failed: {one_line(error)} (bench --debug ... shows where)")
    finally:
        if handling_signals:
            for number, handler in previous.items():
                signal.signal(number, handler)


def fail(error: BaseException, debug: bool, code: int, line: str) -> int:
    if debug:
        traceback.print_exception(error)
    print(redact(line), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
