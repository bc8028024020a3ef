"""Tiny randomly initialised causal LMs of seven families, built from configs (no download)."""
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig, OPTForCausalLM, Phi3Config,
                          Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 128


def tiny_model(family: str, layers: int = 2, hidden: int = 32, seed: int = 0, vocab: int = VOCAB, positions: int = 64):
    """A randomly initialised causal LM of ``family`` built from a config (no download); ``positions``:
    its maximum length in tokens."""
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=4)
        model = GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = OPTConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, ffn_dim=2 * hidden, word_embed_proj_dim=hidden)
        model = OPTForCausalLM(cfg)
    elif family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden)
        model = LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = MistralConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden)
        model = MistralForCausalLM(cfg)
    elif family == "gemma3":  # with final logit soft-capping (Gemma 3 270M has none) to cover that path
        cfg = Gemma3TextConfig(vocab_size=vocab, max_position_embeddings=positions, hidden_size=hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                               intermediate_size=2 * hidden, sliding_window=16, final_logit_softcapping=30.0)
        model = Gemma3ForCausalLM(cfg)
    elif family == "qwen2":  # biases on q/k/v
        cfg = Qwen2Config(vocab_size=vocab, max_position_embeddings=positions, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden)
        model = Qwen2ForCausalLM(cfg)
    elif family == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = Phi3Config(vocab_size=vocab, max_position_embeddings=positions, original_max_position_embeddings=positions,
                         hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=2 * hidden, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = Phi3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    model.config.use_cache = False
    return model.eval()


# found with no per-family table (repro.models.block_path): the four paper families, Gemma 3, Qwen2, Phi-3
FAMILIES = ("gpt2", "opt", "llama", "mistral", "gemma3", "qwen2", "phi3")
