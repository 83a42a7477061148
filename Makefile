# infini-bench: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on CI machines; users with GPUs get PyPI's CUDA build of the same version, or pass their own.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# The GPU machine may have no network: use its python if .venv was not made there.
BENCH_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
BENCH_OUT ?= outputs/bench.json
BENCH_MD ?= docs/BENCHMARKS.md
NGPU ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed ## create .venv and install the project (torch first, see TORCH_SPEC)

run: install ## the embedded default main job on CPU (python run.py)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python run.py $(ARGS)

test: install ## run the test suite (no network, about 14 minutes on 2 CPU cores)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q $(ARGS)

bench: ## the benchmarks on one GPU (train, prefill, decode) -> docs/BENCHMARKS.md
	$(BENCH_PYTHON) -m bench.bench all --compile --out $(BENCH_OUT) --write-md $(BENCH_MD) $(ARGS)

gpu-smoke: ## every memory compiled, a few training steps and a streamed evaluation on the GPU (two to three minutes)
	$(BENCH_PYTHON) scripts/gpu_smoke.py $(ARGS)

bench-cpu: install ## the same benchmarks at tiny sizes on the CPU (CI runs them through tests/test_bench.py)
	$(BIN)/python -m bench.bench --cpu all --out outputs/bench-cpu.json $(ARGS)

fsdp-bench: ## FSDP2 throughput and memory of the 1B and 8B shapes on all local GPUs (torchrun)
	$(BENCH_PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NGPU) scripts/fsdp_bench.py \
		--runs 1b:4096:4 1b:32768:1 8b:8192:1 --out outputs/fsdp.json $(ARGS)

# One process per GPU under torchrun when there are several GPUs, else a plain process.
LAUNCH = $(if $(filter-out 0 1,$(NGPU)),$(BIN)/python -m torch.distributed.run --standalone --nproc_per_node=$(NGPU),$(BIN)/python)
CONTINUAL = outputs/continual

reproduce-all: install ## the paper's runs (Tables 2-4), continual pre-training first: GPUs, hub access, days
	$(LAUNCH) run.py -m experiment=table2_pg19,table2_arxiv_math memory=linear,delta,none,txl,memorizing,rmt $(ARGS)
	@set -e; for m in linear delta; do \
		$(LAUNCH) run.py experiment=continual_1b memory=$$m hydra.run.dir=$(CONTINUAL)/1b-$$m $(ARGS); \
		$(LAUNCH) run.py -m experiment=table3_passkey_1b memory=$$m task.zero_shot=true,false \
			model.init_from=$(CONTINUAL)/1b-$$m/model.safetensors $(ARGS); \
		$(LAUNCH) run.py experiment=continual_8b memory=$$m hydra.run.dir=$(CONTINUAL)/8b-$$m $(ARGS); \
		$(LAUNCH) run.py experiment=table4_booksum memory=$$m model.init_from=$(CONTINUAL)/8b-$$m/model.safetensors $(ARGS); \
	done
	$(MAKE) report

# The paper's claims at one-GPU scale, offline: every memory in conf/memory/, one process per local GPU at a time.
MINI ?= outputs/mini
MEMORIES ?= $(sort $(basename $(notdir $(wildcard conf/memory/*.yaml))))
VARIANTS = $(BENCH_PYTHON) scripts/passkey_gpu_variants.py
EACH_MEMORY = $(foreach m,$(MEMORIES),--variant $(m)=memory=$(m))

# Table 2's seeds: three for none and linear, two for every other memory; four runs side by side per GPU.
# RMT and Memorizing run their 16 sequences per step as one micro-batch (16 x 1, not 8 x 2): the same optimizer
# step, and their per-segment work (RMT's segments one after another, the kNN search) launches half as often
# (their committed runs were made so).
SEEDS_OF = $(if $(filter none linear,$(1)),0 1 2,0 1)
MICRO_OF = $(if $(filter memorizing rmt,$(1)), trainer.batch_size=16 trainer.grad_accum=1,)
EACH_MEMORY_SEED = $(foreach m,$(MEMORIES),$(foreach s,$(call SEEDS_OF,$(m)),--variant "$(m)-s$(s)=memory=$(m) seed=$(s)$(call MICRO_OF,$(m))"))

# Infini-attention's ablation study on the same recipe (docs/ABLATIONS.md): each arm with seeds 0 and 1, four runs
# side by side per GPU. An arm is name:override,override; `make ablations-mini ABLATIONS="..."` runs a subset.
comma := ,
ABLATIONS ?= linear-empty_local:memory=linear,memory.empty_read=local \
	delta-empty_local:memory=delta,memory.empty_read=local \
	linear-gate_init_-2:memory=linear,model.gate_init=-2 \
	linear-gate_init_-4:memory=linear,model.gate_init=-4 \
	linear-gate_lr_1e-3:memory=linear,trainer.gate_lr=1e-3 \
	linear-read_norm:memory=linear,memory.read_norm=rms \
	delta-read_norm:memory=delta,memory.read_norm=rms \
	linear-fp32:memory=linear,memory.products=fp32 \
	linear-detached:memory=linear,memory.backprop=detached \
	delta-gate_init_-2:memory=delta,model.gate_init=-2 \
	delta-gate_init_-4:memory=delta,model.gate_init=-4 \
	delta-fp32:memory=delta,memory.products=fp32 \
	delta-detached:memory=delta,memory.backprop=detached \
	none-files:memory=none,task.train_documents=file \
	linear-files:memory=linear,task.train_documents=file \
	none-doc_start:memory=none,task.train_documents=file,task.window_start=document,task.min_doc_tokens=1 \
	linear-doc_start:memory=linear,task.train_documents=file,task.window_start=document,task.min_doc_tokens=1
ARM_NAME = $(word 1,$(subst :, ,$(1)))
ARM_OVERRIDES = $(subst $(comma), ,$(word 2,$(subst :, ,$(1))))
EACH_ABLATION_SEED = $(foreach a,$(ABLATIONS),$(foreach s,0 1,--variant "$(call ARM_NAME,$(a))-s$(s)=$(call ARM_OVERRIDES,$(a)) seed=$(s)"))

ablations-mini: ## Infini-attention's ablations on the Table 2 recipe, two seeds per arm (docs/ABLATIONS.md), then the report
	-HF_HUB_OFFLINE=1 $(VARIANTS) $(MINI)/ablations --experiment table2_mini --per-gpu 4 --budget 1200 $(EACH_ABLATION_SEED) -- $(ARGS)
	$(MAKE) report

# Associative recall across segments (docs/RECALL.md), a diagnostic beyond the paper: every memory with seeds 0
# and 1 on experiment=recall_gpu, seven runs side by side per GPU (each trains 400 s; on an H200 they peaked at
# 2.2-3.3 GiB, RMT at 12.8, docs/RECALL.md); each evaluates pairs 8-512 by gaps 1-16 segments.
RECALL_SEEDS ?= 0 1
# Wall-clock seconds per run (400 of training, then the evaluation). An equal number of steps for every memory
# instead: make recall-grid ARGS="trainer.time_budget_s=null trainer.steps=2600" RECALL_BUDGET=900
RECALL_BUDGET ?= 490
# Memorizing's store holds 4,096 tokens here, not the paper's 65,000: the longest sample is 2,560 tokens, so nothing
# is ever evicted and every read is the same, while a step no longer allocates and copies a 65,000-slot store per
# sample row (a training step of a small recall model on 2 CPU cores took 1.6-4.8 s with it, 0.19-0.25 s without).
RECALL_KNN_SIZE = 4096
EACH_MEMORY_RECALL = $(foreach m,$(MEMORIES),$(foreach s,$(RECALL_SEEDS),--variant "$(m)-s$(s)=memory=$(m) seed=$(s)$(if $(filter memorizing,$(m)), memory.knn_size=$(RECALL_KNN_SIZE))"))

recall-grid: ## associative recall (pairs x gap) for every memory, seeds 0 and 1, on one GPU's budget (docs/RECALL.md)
	-HF_HUB_OFFLINE=1 $(VARIANTS) $(MINI)/recall --experiment recall_gpu --per-gpu 7 --budget $(RECALL_BUDGET) $(EACH_MEMORY_RECALL) -- $(ARGS)

# Figure 4's direction at one-GPU scale (docs/BOOKSUM.md). First the base decoder (experiment=booksum_gpu_base: no
# memory, trained to copy the events of a short book it sees whole into its summary; 200 s), then every memory in
# conf/memory/ (full too: the 4-layer model's whole KV cache at 32K is 128 MiB) with seeds 0 and 1 on
# experiment=booksum_gpu, each starting from that base, one seed's seven runs side by side per GPU (300 s of training on whole
# 32K-token books, then summaries from 512 to 32K tokens beside the oracle rows). One base for both seeds: on one
# H200 the seed-0 base had not learned the copy after 3,655 steps, the seed-1 base had by step 3,000. RMT
# backpropagates through 16 segments: through all 256, its first gradient was NaN.
BOOKSUM_SEEDS ?= 0 1
BOOKSUM_BASE_SEED ?= 1
BOOKSUM_BUDGET ?= 530
BOOKSUM_BASE = $(MINI)/booksum_gpu_base/s$(BOOKSUM_BASE_SEED)/model.safetensors
BOOKSUM_OF = $(if $(filter rmt,$(1)), memory.bptt_depth=16,)
EACH_MEMORY_BOOKSUM = $(foreach s,$(BOOKSUM_SEEDS),$(foreach m,$(MEMORIES),--variant "$(m)-s$(s)=memory=$(m) seed=$(s) model.init_from=$(BOOKSUM_BASE)$(call BOOKSUM_OF,$(m))"))
BOOKSUM_BASES = HF_HUB_OFFLINE=1 $(VARIANTS) $(MINI)/booksum_gpu_base --experiment booksum_gpu_base --per-gpu 3 --budget 280 --variant "s$(BOOKSUM_BASE_SEED)=seed=$(BOOKSUM_BASE_SEED)" -- $(ARGS)
# Does a memory carry an event across 2-8 segments? none, linear, full and Memorizing with seeds 0 and 1 on
# experiment=booksum_gpu_short (the base's short books in segments of 256), eight runs side by side, 240 s each.
# Then scripts/booksum_memory_probe.py on every run that finished: what each memory adds to the summary's tokens
# (carried against wiped) and where the linear memory reads from, in <folder>/probe.json.
BOOKSUM_PROBE = $(BENCH_PYTHON) scripts/booksum_memory_probe.py $$(for d in $(1)/*/; do [ -f $$d/model.safetensors ] && echo $$d; done) --out $(1)/probe.json
EACH_MEMORY_BOOKSUM_SHORT = $(foreach m,none linear full memorizing,$(foreach s,$(BOOKSUM_SEEDS),--variant "$(m)-s$(s)=memory=$(m) seed=$(s) model.init_from=$(BOOKSUM_BASE)"))

booksum-grid: ## BookSum's length sweep (synthetic books, 512 to 32K tokens) for every memory, seeds 0 and 1, on one GPU (docs/BOOKSUM.md)
	-$(BOOKSUM_BASES)
	-HF_HUB_OFFLINE=1 $(VARIANTS) $(MINI)/booksum_gpu --experiment booksum_gpu --per-gpu 7 --budget $(BOOKSUM_BUDGET) $(EACH_MEMORY_BOOKSUM) -- $(ARGS)
	-$(call BOOKSUM_PROBE,$(MINI)/booksum_gpu)

booksum-short: ## BookSum on books of 8 segments: does a memory carry an event a few segments? (docs/BOOKSUM.md)
	-$(if $(wildcard $(BOOKSUM_BASE)),,$(BOOKSUM_BASES))
	-HF_HUB_OFFLINE=1 $(VARIANTS) $(MINI)/booksum_gpu_short --experiment booksum_gpu_short --per-gpu 8 --budget 320 $(EACH_MEMORY_BOOKSUM_SHORT) -- $(ARGS)
	-$(call BOOKSUM_PROBE,$(MINI)/booksum_gpu_short)

# Paper Table 3 at one-GPU scale (docs/PASSKEY.md). First a base decoder per seed (experiment=passkey_gpu_base: no
# memory, trained to copy the key it can see; 220 s each, side by side), then every memory with seeds 0 and 1 on
# experiment=passkey_gpu, each starting from its seed's base, seven runs side by side per GPU (330 s of training, then
# the evaluation from 2K to 1M tokens; on one H200 each run took 370-490 s). Memorizing trains with a 4,096-slot store
# (longer than any training prompt, so it loses nothing) and is evaluated with one that holds the whole 1M-token prompt
# (memory.eval_knn_size), 10 prompts at a time; full attention is evaluated up to 32K, as far as its whole KV cache
# and quadratic prefill reach.
PASSKEY_SEEDS ?= 0 1
PASSKEY_BUDGET ?= 535
PASSKEY_BASE = $(MINI)/passkey_gpu_base
PASSKEY_OF = $(if $(filter memorizing,$(1)), memory.knn_size=4096 memory.eval_knn_size=1049000 task.eval_batch=10,)$(if $(filter full,$(1)), task.lengths=[2048$(comma)8192$(comma)32768],)
EACH_MEMORY_PASSKEY = $(foreach m,$(MEMORIES),$(foreach s,$(PASSKEY_SEEDS),--variant "$(m)-s$(s)=memory=$(m) seed=$(s) model.init_from=$(PASSKEY_BASE)/s$(s)/model.safetensors$(call PASSKEY_OF,$(m))"))
EACH_PASSKEY_BASE = $(foreach s,$(PASSKEY_SEEDS),--variant "s$(s)=seed=$(s)")
PASSKEY_BASES = HF_HUB_OFFLINE=1 $(VARIANTS) $(PASSKEY_BASE) --experiment passkey_gpu_base --per-gpu 3 --budget 280 $(EACH_PASSKEY_BASE) -- $(ARGS)
PASSKEY_MEMORIES = HF_HUB_OFFLINE=1 $(VARIANTS) $(1) --experiment passkey_gpu --per-gpu 7 --budget $(PASSKEY_BUDGET) $(EACH_MEMORY_PASSKEY) -- $(ARGS)

passkey-grid: ## passkey retrieval (Table 3) from 2K to 1M tokens for every memory, seeds 0 and 1, on one GPU (docs/PASSKEY.md)
	-$(PASSKEY_BASES)
	-$(call PASSKEY_MEMORIES,$(MINI)/passkey_gpu)

reproduce-mini: ## Table 2 (table2_mini, every memory with seeds), passkey (passkey_gpu) and the BookSum pipeline, offline, then the report
	-HF_HUB_OFFLINE=1 $(VARIANTS) $(MINI)/table2 --experiment table2_mini --per-gpu 4 --budget 1200 $(EACH_MEMORY_SEED) -- $(ARGS)
	-$(PASSKEY_BASES)
	-$(call PASSKEY_MEMORIES,$(MINI)/passkey)
	-HF_HUB_OFFLINE=1 $(VARIANTS) $(MINI)/booksum --experiment none --budget 900 $(EACH_MEMORY) -- task=booksum $(ARGS)
	$(BENCH_PYTHON) -m infini_bench.report outputs multirun --out docs/REPORT.md

# How table2_mini's model was chosen: memory=none at three shapes, each for the same 6 minutes of training with
# four runs side by side on one GPU (the fourth, RMT, shows the slowest memory's speed under that load),
# scored on the validation packages.
ARCH_8x768 = model.arch={dim:768,n_layers:8,n_heads:12,n_kv_heads:12,head_dim:64,ffn_dim:3072}
SCAN_SHAPES = --variant "6x512-n512=memory=none" \
	--variant "8x768-n512=memory=none $(ARCH_8x768)" \
	--variant "8x768-n1024=memory=none $(ARCH_8x768) model.segment_len=1024 task.seq_len=16384 trainer.batch_size=4" \
	--variant "rmt-8x768-n512=memory=rmt $(ARCH_8x768)"

table2-shape-scan: ## the memory=none shape scan behind table2_mini's model (one GPU, four runs at once, 9 minutes)
	-HF_HUB_OFFLINE=1 $(VARIANTS) $(MINI)/table2_scan --experiment table2_mini --per-gpu 4 --budget 555 $(SCAN_SHAPES) \
		-- task.eval_split=validation trainer.steps=100000 trainer.time_budget_s=360 trainer.ckpt_every=100000 $(ARGS)

report: install ## our numbers next to the paper's, from every results.json under outputs/, multirun/ and docs/runs/
	$(BIN)/python -m infini_bench.report outputs multirun docs/runs --out docs/REPORT.md

.PHONY: help install run test bench gpu-smoke bench-cpu fsdp-bench reproduce-all reproduce-mini ablations-mini recall-grid booksum-grid booksum-short passkey-grid table2-shape-scan report
