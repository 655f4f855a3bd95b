"""A whole (very short) fine-tuning run on the sample data, as `make finetune` runs it."""

import csv
import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from dataset_tools.dialogue_format import parse_reply, render_prompt
from trainer.__main__ import main as trainer_main
from trainer.finetune import FinetuneOptions, finetune


def test_run_writes_every_output_and_the_model_loads_and_generates(
    tmp_path, sample_splits, fast_profile
):
    metrics = finetune(
        FinetuneOptions(
            profile=fast_profile,
            data_dir=sample_splits,
            checkpoints_dir=tmp_path,
            run_name="run1",
            n_generate=3,
            progress=False,
        )
    )
    run = tmp_path / "run1"
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "metrics.json",
        "loss.png",
    ):
        assert (run / name).is_file(), name
    assert (tmp_path / "latest").resolve() == run.resolve()
    written = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    for key in (
        "eval_loss",
        "perplexity",
        "perplexity_all",
        "bleu",
        "chrf",
        "distinct_1",
        "distinct_2",
        "tokens_per_s",
        "train_time_s",
        "parameters",
    ):
        assert written[key] is not None, key
    assert written == json.loads(json.dumps(metrics, default=str))
    rows = list(csv.DictReader((tmp_path / "experiments.csv").open(encoding="utf-8")))
    assert [r["run"] for r in rows] == ["run1"]
    assert "| run1 |" in (tmp_path / "EXPERIMENTS.md").read_text(encoding="utf-8")
    generation = json.loads((run / "generation_config.json").read_text(encoding="utf-8"))
    assert generation["do_sample"] is True and len(generation["eos_token_id"]) == 2

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "latest")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "latest")
    ids = tokenizer(render_prompt(["Привет, как дела?"]), return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    reply = parse_reply(tokenizer.decode(out[0, ids["input_ids"].shape[1] :]))
    assert isinstance(reply, str) and "@@" not in reply


def test_resume_continues_from_the_saved_step(tmp_path, sample_splits, fast_profile):
    options = FinetuneOptions(
        profile=fast_profile,
        data_dir=sample_splits,
        checkpoints_dir=tmp_path,
        run_name="r",
        n_generate=0,
        progress=False,
    )
    finetune(options)
    assert (tmp_path / "r" / "checkpoint-4").is_dir()
    longer = FinetuneOptions(
        **{**options.__dict__, "profile": fast_profile.override(max_steps=6), "resume": True}
    )
    metrics = finetune(longer)
    assert metrics["global_step"] == 6
    state = json.loads((tmp_path / "r" / "checkpoint-6" / "trainer_state.json").read_text())
    steps = [e["step"] for e in state["log_history"] if "eval_loss" in e]
    assert steps == [2, 4, 6]  # the first run's evaluations are kept, nothing was redone


def test_loss_falls_when_overfitting_a_handful_of_dialogues(tmp_path, sample_splits, fast_profile):
    profile = fast_profile.override(max_steps=40, eval_steps=40, learning_rate=3e-3)
    finetune(
        FinetuneOptions(
            profile=profile,
            data_dir=sample_splits,
            checkpoints_dir=tmp_path,
            run_name="o",
            limit_train=6,
            n_generate=0,
            progress=False,
        )
    )
    state = json.loads((tmp_path / "o" / "checkpoint-40" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) >= 3
    assert losses[-1] < losses[0] * 0.5, losses


def test_unreachable_base_model_is_one_clear_line(tmp_path, sample_splits, capsys):
    code = trainer_main(
        [
            "finetune",
            "--profile",
            "rugpt3-small",
            "--base-model",
            str(tmp_path / "no-such-model"),
            "--data-dir",
            str(sample_splits),
            "--checkpoints-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: cannot load base model") and "--base-model DIR" in err
    assert "Traceback" not in err


def test_missing_splits_say_to_run_make_dataset(tmp_path, capsys):
    code = trainer_main(
        [
            "finetune",
            "--profile",
            "tiny-scratch",
            "--data-dir",
            str(tmp_path),
            "--checkpoints-dir",
            str(tmp_path / "ck"),
        ]
    )
    assert code == 2 and "make dataset" in capsys.readouterr().err


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys):
    code = trainer_main(
        ["finetune", "--profile", "tiny-scratch", "--resume", "--checkpoints-dir", str(tmp_path)]
    )
    assert code == 2 and "no run with a saved checkpoint" in capsys.readouterr().err
