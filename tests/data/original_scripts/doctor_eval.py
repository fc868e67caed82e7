"""A script in the original tool's style (eval/doctor_eval.py, quantization_example.py, test_quantization.py,
memory_config.py), driven by tests/test_quant_utils.py. Only its import lines differ from the original's:

    from quant_utils import ...    ->  from emq.quant_utils import ...
    from memory_config import ...  ->  from emq.memory_config import ...

    python doctor_eval.py DEMO_DIR OUT_DIR STEP    (STEP: prepare | serve_merged | serve_lora | serve_awq | cleanup)

Each step prints one `RESULT {json}` line. vLLM's LoRARequest lost its `lora_local_path` argument in vLLM 0.8, so
the LoRA step passes lora_path only (a vLLM change, not emq's).
"""
import json
import os
import sys
import time

import torch
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

from emq.memory_config import check_vram_capacity as mc_check_vram_capacity
from emq.memory_config import generate_config_file, get_memory_config
from emq.quant_utils import cleanup_model_cache, prepare_model_for_vllm, was_trained_in_4bit
from emq.quant_utils import (
    check_system_ram,
    check_vram_capacity,
    get_or_create_awq_model,
    get_or_create_merged_model,
    merge_lora_adapter,
    quantize_to_awq,
)

USE_QUANTIZATION = True
FORCE_RECREATE_QUANT = False
CLEANUP_AFTER_EVAL = False
USE_CPU_FOR_MERGING = False
SKIP_QUANTIZATION_ON_LOW_VRAM = True
STOP_ON_FAILURE = True
PROMPT = "<|im_start|>user\nI have had a headache for two days. What should I do?<|im_end|>\n<|im_start|>assistant\n"


def result(**fields):
    print("RESULT " + json.dumps(fields), flush=True)


def generate(llm, lora_request=None):
    sampling_params = SamplingParams(temperature=0, max_tokens=24, n=1)
    if lora_request is not None:
        outputs = llm.generate([PROMPT], sampling_params, lora_request=lora_request)
    else:
        outputs = llm.generate([PROMPT], sampling_params)
    return outputs[0].outputs[0].text.strip()


def prepare(demo, out):
    base_model = os.path.join(demo, "base")
    model_id = os.path.join(demo, "adapters", "good_doctor")
    lora16 = os.path.join(demo, "adapters", "lora16")
    vram_gb, ram_gb = check_vram_capacity(), check_system_ram()
    config = get_memory_config(mc_check_vram_capacity())
    text = generate_config_file(config)
    exec(compile(text, "generated", "exec"), {})  # the generated lines are Python
    trained = [was_trained_in_4bit(model_id), was_trained_in_4bit(lora16),
               was_trained_in_4bit(model_id, os.path.join(model_id, "training_config.json"))]
    t = time.time()
    merged = get_or_create_merged_model(base_model, model_id)
    first_s = time.time() - t
    t = time.time()
    again = get_or_create_merged_model(base_model, model_id)
    cached_s = time.time() - t
    forced = get_or_create_merged_model(base_model, model_id, force_recreate=True, use_cpu=True)
    exported = merge_lora_adapter(base_model, model_id, os.path.join(out, "merged"), use_cpu=USE_CPU_FOR_MERGING)
    prepared_model_path = prepare_model_for_vllm(model_id, USE_QUANTIZATION, STOP_ON_FAILURE)
    unchanged = prepare_model_for_vllm(lora16, USE_QUANTIZATION, True)
    if unchanged != lora16:
        raise RuntimeError("a LoRA not trained in 4-bit must come back as it is")
    no_quant = prepare_model_for_vllm(model_id, use_quantization=False)
    awq_model = quantize_to_awq(merged, os.path.join(out, "awq"), bits=4, group_size=128, desc_act=False, fp16=True)
    awq_again = quantize_to_awq(merged, os.path.join(out, "awq"), 4, 128, True, "GEMM")
    direct = get_or_create_awq_model(base_model, model_id)
    result(step="prepare", vram_gb=vram_gb, ram_gb=ram_gb, config=config, config_text=text, trained=trained,
           merged=merged, again=again, forced=forced, first_s=first_s, cached_s=cached_s, exported=exported,
           prepared=prepared_model_path, unchanged=unchanged, no_quant=no_quant, awq=awq_model, awq_again=awq_again,
           direct=direct, types=sorted({type(p).__name__ for p in (merged, exported, prepared_model_path, awq_model,
                                                                    direct)}))


def serve(demo, out, step):
    model_id = os.path.join(demo, "adapters", "good_doctor")
    lora_request = None
    if step == "serve_merged":  # doctor_eval's base-model branch, verbatim but for the model id
        prepared_model_path = prepare_model_for_vllm(model_id, USE_QUANTIZATION, True)
        llm = LLM(model=prepared_model_path, gpu_memory_utilization=0.9, max_model_len=1024,
                  enable_prefix_caching=True, quantization="bitsandbytes", dtype=torch.bfloat16, max_num_seqs=35)
    elif step == "serve_lora":  # the LoRA branch: the base of the script's choosing + the adapter
        prepared_model_path = prepare_model_for_vllm(model_id, False, True)
        if prepared_model_path != model_id:
            raise RuntimeError("use_quantization=False must return model_id")
        llm = LLM(model=os.path.join(demo, "base"), gpu_memory_utilization=0.90, max_model_len=1024,
                  enable_prefix_caching=True, enable_lora=True, max_loras=1, max_lora_rank=32, max_num_seqs=35)
        lora_request = LoRARequest(lora_name="doctor_lora", lora_int_id=1, lora_path=prepared_model_path)
    else:  # the README's AWQ workflow
        prepared_model_path = get_or_create_awq_model(os.path.join(demo, "base"), model_id)
        llm = LLM(model=prepared_model_path, gpu_memory_utilization=0.9, max_model_len=1024,
                  enable_prefix_caching=True)
    result(step=step, model=prepared_model_path, text=generate(llm, lora_request),
           env={k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")})


def main():
    demo, out, step = sys.argv[1:4]
    if step == "prepare":
        prepare(demo, out)
    elif step == "cleanup":
        cleanup_model_cache()
        result(step=step)
    else:
        serve(demo, out, step)


if __name__ == "__main__":
    main()
