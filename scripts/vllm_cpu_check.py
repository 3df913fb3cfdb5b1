"""Run vLLM's own Medusa code on an nbkit export, on a CPU (a manual check: see README "Scale out").

Run with the python of a side venv that has vLLM installed (scripts/vllm_side_venv.sh), never nbkit's:
    VLLM_TARGET_DEVICE=cpu .cache/vllm-side/bin/python scripts/vllm_cpu_check.py EXPORT_DIR [HIDDEN.safetensors]
It loads EXPORT_DIR/config.json with vLLM's MedusaConfig, builds vLLM's Medusa module, feeds the exported
tensors through its load_weights, runs its default loader's "all weights loaded" check, and, given hidden
states ([N, H] under key "hidden"), prints the draft tokens vLLM's MedusaProposer would take (the argmax of
each head's logits). Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
import types


def main(export_dir: str, hidden_file: str | None = None) -> dict:
    t0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file
    from vllm import __version__
    from vllm.config import LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.transformers_utils.configs.medusa import MedusaConfig

    report: dict = {"vllm_version": __version__}
    config = MedusaConfig.from_pretrained(export_dir)
    report["config"] = {k: getattr(config, k) for k in ("hidden_size", "vocab_size", "num_heads", "num_hidden_layers",
                                                        "truncated_vocab_size", "medusa_fc_bias", "original_lm_head")}
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="tcp://127.0.0.1:29533")
        initialize_model_parallel(1, 1)
        from vllm.model_executor.models.medusa import Medusa

        # Medusa.__init__ reads only speculative_config.draft_model_config.hf_config.
        draft = types.SimpleNamespace(hf_config=config)
        model = Medusa(vllm_config=types.SimpleNamespace(speculative_config=types.SimpleNamespace(
            draft_model_config=draft)))
        loaded = model.load_weights(load_file(f"{export_dir}/model.safetensors").items())
        report["loaded"] = sorted(loaded)
        report["params"] = {n: list(p.shape) for n, p in model.named_parameters()}
        try:
            DefaultModelLoader(LoadConfig()).track_weights_loading(model, loaded)
            report["weights_track"] = "ok"
        except ValueError as err:
            report["weights_track"] = str(err)
        for module in model.modules():  # what the loader does next (sets up the CPU matmul)
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        if hidden_file:
            hidden = load_file(hidden_file)["hidden"].to(torch.float32)
            with torch.inference_mode():
                logits = model.compute_logits(model(hidden))
            report["draft_tokens"] = torch.stack([x.argmax(dim=-1) for x in logits], dim=1).tolist()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:3])))
