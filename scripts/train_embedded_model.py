"""Train the embedded default model: a small fine-grained MoE LM (Qwen3-MoE class) on the Brown Corpus, on CPU.

    python scripts/train_embedded_model.py --minutes 55 --out models/brown-moe

Fixed seed. Shape chosen like the models the papers study (many small experts,
top-k well above 1): 8 layers, hidden 192, 64 experts, top-8, expert
intermediate 64, vocab 8192 (byte-level BPE trained on the train split), tied
embeddings while training (saved untied, with an explicit ``lm_head.weight``: SGLang's
Qwen3-MoE class never ties its output layer and would serve an untrained head), load-balancing auxiliary loss 0.01 so experts specialise. Trains on
random 256-token windows of data/brown/train.txt.xz with AdamW (warm-up, cosine
decay) until the time budget is spent, using transformers' own ``grouped_mm``
experts implementation (same parameters as the eager one, so the saved
checkpoint loads into the stock class). Writes config.json, model.safetensors
(fp16), tokenizer.json and train_log.json (loss curve, held-out perplexity).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "brown"
# A base LM has no chat format: the OpenAI chat endpoint continues the messages' text (blank-line separated).
CHAT_TEMPLATE = "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ m['content'] }}{% endfor %}"


def read(split: str) -> str:
    with lzma.open(DATA / f"{split}.txt.xz", "rt", encoding="utf-8") as f:
        return f.read()


def train_tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok


def encode(tok, text: str) -> torch.Tensor:
    eot = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for doc in text.split("\n\n"):
        ids += tok.encode(doc).ids + [eot]
    return torch.tensor(ids, dtype=torch.int64)


def model_config(vocab: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=192, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
        head_dim=32, intermediate_size=512, moe_intermediate_size=64, num_experts=64, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.01,
        output_router_logits=False, tie_word_embeddings=True, max_position_embeddings=1024, rope_theta=10000.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, torch_dtype="float32",
    )


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq: int = 256, max_windows: int = 200) -> float:
    model.eval()
    n = min(max_windows, (len(ids) - 1) // seq)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = [ids[j * seq:(j + 1) * seq + 1] for j in range(i, min(n, i + 8))]
        x = torch.stack(rows)
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())  # HF shifts labels internally
        total += float(out.loss) * x.shape[0] * (seq - 1)
        count += x.shape[0] * (seq - 1)
    model.train()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=55.0)
    ap.add_argument("--out", default=str(ROOT / "models" / "brown-moe"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--experts-impl", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"])
    ap.add_argument("--probe-steps", type=int, default=0, help="only time this many steps and exit")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import PreTrainedTokenizerFast, Qwen3MoeForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text = read("train")
    tok = train_tokenizer(train_text, 8192)
    train_ids = encode(tok, train_text)
    test_ids = encode(tok, read("test"))
    cfg = model_config(tok.get_vocab_size())
    cfg._experts_implementation = args.experts_impl
    model = Qwen3MoeForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.1f} M parameters; train {len(train_ids)} tokens, test {len(test_ids)} tokens", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    est_steps = None
    log, step, t0 = [], 0, time.time()
    warmup = 100
    model.train()
    while True:
        elapsed = time.time() - t0
        if args.probe_steps and step >= args.probe_steps:
            print(f"probe: {step * args.batch * args.seq / elapsed:.0f} tokens/s", flush=True)
            return
        if elapsed > budget:
            break
        if est_steps is None and step == 20:
            est_steps = int(budget / (elapsed / step))
        total = est_steps or 10**6
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total))))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s:s + args.seq] for s in starts.tolist()])
        outp = model(input_ids=x, labels=x.clone(), output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            rec = {"step": step, "minutes": round((time.time() - t0) / 60, 2), "loss": round(float(outp.loss), 4),
                   "aux_loss": round(float(outp.aux_loss), 4), "lr": round(lr, 6)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
    ppl = perplexity(model, test_ids)
    tokens_seen = step * args.batch * args.seq
    print(f"done: {step} steps, {tokens_seen} tokens, held-out perplexity {ppl:.2f}", flush=True)
    model.config._experts_implementation = "eager"
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.half().save_pretrained(out, safe_serialization=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    (out / "train_log.json").write_text(json.dumps({
        "command": "python scripts/train_embedded_model.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "probe_steps"),
        "parameters": n_params, "steps": step, "tokens_seen": tokens_seen,
        "minutes": round((time.time() - t0) / 60, 2), "heldout_perplexity_fp32": ppl, "log": log,
        "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
