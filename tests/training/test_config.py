"""SpecialistConfig: the run's one seed decides the split, the data order and the new weights; one chunking default."""

from __future__ import annotations

import torch

from atelier.config import load_config
from training.config import SpecialistConfig
from training.data import DEFAULT_CHUNKING, split_documents


def config_with(seed: int, **overrides) -> SpecialistConfig:
    """Through the loader `atelier specialist add --seed N` uses."""
    return load_config(SpecialistConfig, None, {"seed": seed, **overrides})


def first_batch_and_weights(config: SpecialistConfig, base, data_dir, out_dir):
    """The first training batch SFT would take, and the new adapter's first LoRA matrix."""
    from training.sft import build_sft_trainer

    stage = config.sft.model_copy(update={"seq_len": 128, "max_steps": 2, "packing": False})
    trainer = build_sft_trainer(base, data_dir, out_dir, stage, config.lora)
    batch = next(iter(trainer.get_train_dataloader()))["input_ids"]
    lora_a = next(p for name, p in trainer.model.named_parameters() if "lora_A" in name)
    return batch.clone(), lora_a.detach().clone()


def test_the_run_seed_seeds_every_section_unless_one_sets_its_own():
    config = config_with(7)
    assert (config.data.seed, config.dapt.seed, config.sft.seed, config.dpo.seed) == (7, 7, 7, 7)
    own = config_with(7, **{"sft.seed": 3})
    assert (own.data.seed, own.dapt.seed, own.sft.seed, own.dpo.seed) == (7, 7, 3, 7)
    assert SpecialistConfig.model_validate(own.model_dump()) == own  # a stored record reads back the same


def test_same_seed_same_split_other_seed_other_split():
    from retrieval.documents import load_folder
    from tests.training.conftest import DOCS

    docs = load_folder(DOCS).documents

    def heldout(seed: int) -> list[str]:
        data = config_with(seed).data
        return sorted(d.doc_id for d in split_documents(docs, data.heldout_fraction, data.seed)[1])

    assert heldout(0) == heldout(0)
    assert len({tuple(heldout(seed)) for seed in range(4)}) > 1


def test_same_seed_same_first_batch_and_weights_other_seed_different(tiny_base, small_data, tmp_path):
    same_a, same_b, other = (
        first_batch_and_weights(config_with(seed), tiny_base, small_data, tmp_path / str(i))
        for i, seed in enumerate((1, 1, 2))
    )
    assert torch.equal(same_a[0], same_b[0]) and torch.equal(same_a[1], same_b[1])
    assert not torch.equal(same_a[0], other[0])  # data order
    assert not torch.equal(same_a[1], other[1])  # new adapter weights


def test_training_chunking_has_one_default():
    assert SpecialistConfig().chunking == DEFAULT_CHUNKING
    assert SpecialistConfig().chunking is not DEFAULT_CHUNKING  # a copy: changing one run's config changes no other
