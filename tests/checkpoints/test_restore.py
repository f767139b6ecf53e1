"""Real tiny models: a full model and a LoRA adapter restore with a matching fingerprint, tampered
weights are caught, and a transformers Trainer checkpoint round-trips and resumes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from finetune_trainer.checkpoints import RestoreCheck, S3Sink, write_fingerprint  # noqa: E402
from finetune_trainer.checkpoints.describe import build_manifest  # noqa: E402
from finetune_trainer.checkpoints.fingerprint import model_fingerprint, read_fingerprint  # noqa: E402

torch.set_num_threads(1)


def tiny_llama(folder: Path, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return model


def tamper_weights(file: Path, change: Any, only: str = "") -> None:
    """A plausible but wrong save: tensors changed, the file still loads."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(file)
    for name in sorted(tensors):
        if only in name and tensors[name].dim() == 2:
            tensors[name] = change(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})


def commit(store: Any, config: Any, folder: Path, step: int) -> Any:
    return store.commit(folder, build_manifest(folder, config, step, {}, read_fingerprint(folder)))


@pytest.fixture
def full_config(new_config: Any) -> Any:
    return new_config(keep=5, verifyRestore=True)


def test_full_model_restores_with_matching_fingerprint_and_tampering_is_caught(
    full_config: Any, make_store: Any, s3: Any, tmp_path: Path
) -> None:
    store = make_store(full_config, restore_check=RestoreCheck())
    saved = tmp_path / "step-1"
    live = write_fingerprint(tiny_llama(saved), saved)
    tampered = tmp_path / "step-2"
    shutil.copytree(saved, tampered)
    # Hashed as saved, so only the restore can tell.
    tamper_weights(tampered / "model.safetensors", lambda t: t + 0.05, only="layers.0.mlp.down_proj")

    good = store.verify(commit(store, full_config, saved, 1))
    bad = store.verify(commit(store, full_config, tampered, 2))

    assert good.ok and good.fingerprint is not None
    assert good.fingerprint["loss"] == pytest.approx(live["loss"], rel=1e-5)
    assert not bad.ok and bad.reason.startswith("restored model differs from the saved one: ")
    assert "after restore" in bad.reason and "at save" in bad.reason
    selection = store.latest_verified()
    assert selection.checkpoint is not None and selection.checkpoint.step == 1
    assert [s.step for s in selection.skipped] == [2]


def test_lora_adapter_restores_onto_its_base_and_tampering_is_caught(
    full_config: Any, make_store: Any, tmp_path: Path
) -> None:
    base_dir = tmp_path / "base"
    base = tiny_llama(base_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    live = write_fingerprint(model, adapter)
    store = make_store(full_config, restore_check=RestoreCheck(base_model=base_dir))

    result = store.verify(commit(store, full_config, adapter, 1))
    base_only = model_fingerprint(transformers.AutoModelForCausalLM.from_pretrained(base_dir))

    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    assert result.ok and result.fingerprint is not None
    assert result.fingerprint["loss"] == pytest.approx(live["loss"], rel=1e-5)
    assert abs(base_only["logitsAbsMean"] - live["logitsAbsMean"]) > 1e-3, "the adapter must show"
    tamper_weights(
        adapter / "adapter_model.safetensors", torch.zeros_like, only="lora_B"
    )  # an untrained save
    assert not store.verify(commit(store, full_config, adapter, 2)).ok


class _SaveToSink(transformers.TrainerCallback):  # type: ignore[misc]
    """What the trainer's checkpoint callback does: hand each saved folder to the sink."""

    def __init__(self, sink: S3Sink) -> None:
        self.sink = sink
        self.infos: list[Any] = []
        self.steps_trained = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps_trained += 1

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_fingerprint(model, folder)
        self.infos.append(self.sink.save(folder, state.global_step, {}))


def _train(base_dir: Path, out: Path, sink: S3Sink, max_steps: int, resume: Path | None = None) -> Any:
    torch.manual_seed(1)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (16, 12)).tolist()]
    callback = _SaveToSink(sink)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        save_steps=2,
        save_total_limit=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, callback


def test_trainer_checkpoint_round_trips_and_resumes_where_it_stopped(
    full_config: Any, make_store: Any, tmp_path: Path
) -> None:
    base_dir = tmp_path / "base"
    tiny_llama(base_dir)
    store = make_store(full_config, restore_check=RestoreCheck())
    sink = S3Sink(store, full_config)
    _, first = _train(base_dir, tmp_path / "run1", sink, max_steps=4)
    sink.close()
    saved = tmp_path / "run1" / "checkpoint-4"  # transformers rotated checkpoint-2 away

    assert [(i.step, i.verified) for i in first.infos] == [(2, True), (4, False)]
    assert [(c.step, c.verified) for c in store.checkpoints()] == [(2, True), (4, True)]

    restored = S3Sink(make_store(full_config, restore_check=RestoreCheck()), full_config).restore(
        tmp_path / "run2"
    )

    assert restored == tmp_path / "run2" / "checkpoint-4"
    names = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    } <= names
    for name in names:
        assert (restored / name).read_bytes() == (saved / name).read_bytes(), name
    resume_sink = S3Sink(make_store(full_config), full_config)
    trainer, second = _train(base_dir, tmp_path / "run2", resume_sink, max_steps=6, resume=restored)
    resume_sink.close()

    assert trainer.state.global_step == 6 and second.steps_trained == 2, "no step trained twice"
    assert [c.step for c in store.checkpoints() if c.committed] == [2, 4, 6]
