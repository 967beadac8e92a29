"""PEFT adapters made by PEFT itself, saved with `save_pretrained`, for the importer tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def peft_folder(model: torch.nn.Module, config, folder: Path, seed: int = 0):
    """get_peft_model on a copy, non-zero random lora_B and saved head (modules_to_save),
    save_pretrained; returns the PEFT model. The head gets N(0, 1/hidden) weights, so its
    outputs differ clearly between inputs (transformers' init of 0.02 gives near-flat ones)."""
    from peft import get_peft_model

    pm = get_peft_model(copy.deepcopy(model), config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (3.0 / p.shape[-1] ** 0.5))
    pm.save_pretrained(folder)
    return pm


def seq_cls_peft(minilm_dir: Path, folder: Path, id2label: dict[int, str], seed: int = 0):
    """A SEQ_CLS LoRA on BertForSequenceClassification of the embedded MiniLM, its label
    names saved beside it in config.json. `dense` targets BERT's pooler too, which its
    classifier reads."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the classifier's random init
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=len(id2label), id2label=id2label
    ).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    pm = peft_folder(model, config, folder, seed=seed)
    model.config.save_pretrained(folder)
    return pm


def qa_peft(minilm_dir: Path, folder: Path, seed: int = 0):
    """A QUESTION_ANS LoRA on BertForQuestionAnswering of the embedded MiniLM."""
    from peft import LoraConfig
    from transformers import AutoModelForQuestionAnswering

    torch.manual_seed(seed)  # qa_outputs' random init
    model = AutoModelForQuestionAnswering.from_pretrained(minilm_dir).eval()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value"], task_type="QUESTION_ANS")
    return peft_folder(model, config, folder, seed=seed)
