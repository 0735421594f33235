"""bench.adapters: one test per private API or internal format of a dependency, failing on a release that
changes it (pyproject.toml bounds Optuna for them)."""

import concurrent.futures
import multiprocessing
import os
import time
from pathlib import Path

import optuna
import torch
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from bench.adapters import JournalFile, trial_id, trial_storage

LOGS = [{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}, {"op_code": 4, "value": 1.5}]


def test_journal_file_writes_the_bytes_optuna_writes_and_optuna_reads_them_back(tmp_path):
    ours, theirs = tmp_path / "ours.log", tmp_path / "theirs.log"
    JournalFile(str(ours), repair=lambda path: None).append_logs(LOGS)
    JournalFileBackend(str(theirs)).append_logs(LOGS)
    assert ours.read_bytes() == theirs.read_bytes()
    assert list(JournalFileBackend(str(ours)).read_logs(0)) == LOGS


def test_journal_file_repairs_under_optunas_lock_before_each_append(tmp_path):
    path, seen = tmp_path / "journal.log", []
    lock = Path(f"{path}.lock")  # Optuna's symlink lock: the link exists while the lock is held

    def repair(where: Path) -> None:
        seen.append((where, lock.is_symlink(), where.read_bytes().count(b"\n")))

    storage = JournalStorage(JournalFile(str(path), repair=repair))
    optuna.create_study(study_name="s", storage=storage).add_trial(optuna.trial.create_trial(value=2.0))
    lines = path.read_bytes().count(b"\n")
    assert [held for _, held, _ in seen] == [True] * len(seen) and {where for where, _, _ in seen} == {path}
    assert [count for _, _, count in seen] == [0, *range(lines)]  # when opened, then before each append
    assert not lock.exists()
    assert [t.value for t in optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(
        str(path)))).trials] == [2.0]


def test_trial_id_and_storage_address_the_trial_in_its_storage():
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="other", storage=storage).ask()  # ids count across studies, numbers do not
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    assert trial_storage(trial) is storage
    assert (trial.number, trial_id(trial)) == (0, 1)
    frozen = study.get_trials(deepcopy=False)[0]
    assert trial_id(frozen) == 1
    assert storage.set_trial_state_values(trial_id(frozen), TrialState.FAIL)
    assert storage.get_trial(trial_id(trial)).state == TrialState.FAIL


def test_rnn_tanh_takes_its_arguments_by_keyword_and_runs_the_elman_recurrence():
    """bench.models.elman scores through torch.rnn_tanh / rnn_relu (an undocumented function): pin it to
    h_t = f(x_t + W h_{t-1}) with the identity as input weight, batch first, computed by hand."""
    torch.manual_seed(0)
    inputs, h0, weight = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), \
        torch.randn(3, 3, dtype=torch.float64)
    for run, activation in ((torch.rnn_tanh, torch.tanh), (torch.rnn_relu, torch.relu)):
        states, last = run(inputs, h0.unsqueeze(0), [torch.eye(3, dtype=torch.float64), weight], has_biases=False,
                           num_layers=1, dropout=0.0, train=False, bidirectional=False, batch_first=True)
        h, expected = h0, []
        for t in range(5):
            h = activation(inputs[:, t] + h @ weight.T)
            expected.append(h)
        torch.testing.assert_close(states, torch.stack(expected, dim=1), rtol=0, atol=1e-12)
        torch.testing.assert_close(last, h.unsqueeze(0), rtol=0, atol=1e-12)


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)  # both workers busy at once, so each task runs in its own process
    return os.getpid()


def test_the_sweep_pools_workers_are_the_active_children_it_signals():
    """bench.sweeps forwards a signal to multiprocessing.active_children() (public) instead of reading
    ProcessPoolExecutor's private _processes: the pool's workers must be among them, and nothing else."""
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        workers = set(pool.map(_pid_after, [0.5, 0.5]))
        assert {process.pid for process in multiprocessing.active_children()} == workers and len(workers) == 2
