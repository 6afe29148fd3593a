from rich.console import Console
from wandb_offline import read_run

from vespo.config.run_config import WandbConfig
from vespo.reporting.run_logger import RunLogger, redact


def test_redact_hides_secrets_at_any_depth():
    cfg = {"wandb": {"api_key": "abc", "project": "p"}, "hf_token": "t", "lr": 1.0, "list": [{"secret": 1}]}
    assert redact(cfg) == {
        "wandb": {"api_key": "<redacted>", "project": "p"},
        "hf_token": "<redacted>",
        "lr": 1.0,
        "list": [{"secret": "<redacted>"}],
    }


def test_offline_run_records_metrics_and_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "should-never-appear")
    console = Console(record=True, width=200)
    logger = RunLogger(WandbConfig(mode="offline", dir=str(tmp_path)), {"lr": 0.1, "api_key": "x"}, console)
    for step in range(3):
        logger.log({"reward/mean": 0.1 * step, "actor/loss": 1.0 - step}, step, {"staleness/hist": [0, 1, 1, 2]})
    where = logger.location
    logger.finish()
    history, config = read_run(next((tmp_path / "wandb").glob("offline-run-*")))
    assert [row["reward/mean"] for row in history] == [0.0, 0.1, 0.2]
    assert [row["actor/loss"] for row in history] == [1.0, 0.0, -1.0]
    assert all(sum(row["staleness/hist/values"]) == 4 for row in history)  # a histogram of the 4 values
    assert config["lr"] == 0.1 and config["api_key"] == "<redacted>"
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert b"should-never-appear" not in f.read_bytes(), f
    assert "step 2" in console.export_text() and str(tmp_path) in where


def test_disabled_logs_to_console_only(tmp_path):
    console = Console(record=True, width=200)
    logger = RunLogger(WandbConfig(mode="disabled", dir=str(tmp_path)), {}, console)
    logger.log({"reward/mean": 0.5}, 7)
    logger.finish()
    text = console.export_text()
    assert "step 7" in text and "reward=0.5" in text
    assert "kl_cap" not in text  # no divergence budget, no cap to show
    assert not any(tmp_path.iterdir())


def test_the_console_line_shows_the_cap_a_divergence_budget_sets(tmp_path):
    console = Console(record=True, width=200)
    logger = RunLogger(WandbConfig(mode="disabled", dir=str(tmp_path)), {}, console)
    logger.log({"reward/mean": 0.5, "staleness/token_max": 2.0, "divergence/staleness_cap": 3.0}, 1)
    logger.finish()
    assert "stale_max=2  kl_cap=3" in console.export_text()


def test_console_prints_about_fifty_lines_a_run_plus_every_evaluation(tmp_path):
    console = Console(record=True, width=200)  # not a terminal: lines only, no live bar
    logger = RunLogger(WandbConfig(mode="disabled", dir=str(tmp_path)), {}, console, total_steps=500)
    for step in range(1, 501):
        metrics = {"reward/mean": step / 500}
        if step % 75 == 0:
            metrics["eval/accuracy"] = 0.5
        logger.log(metrics, step)
    logger.finish()
    lines = [line for line in console.export_text().splitlines() if line.startswith("step ")]
    shown = [int(line.split()[1].split("/")[0]) for line in lines]
    assert shown[0] == 1 and shown[-1] == 500 and {75, 150, 225} <= set(shown)
    assert 50 <= len(lines) <= 60
    assert "step 500/500" in lines[-1] and "eta 0m00s" in lines[-1] and "eval_acc" in lines[shown.index(75)]
