"""gpt_tiny with a mixture of experts in every block: 4 experts of d_ff=384, each token routed to 2 (Mixtral's
top-2 renormalised router), dropless dispatch. Same attention and embedding as gpt_tiny; twice its MLP compute per
token, four times its MLP parameters (train rows: train_moe_aux_loss, train_expert_load/<e>, ...)."""
from configs import gpt_tiny


def get_config():
  config = gpt_tiny.get_config()
  config.model.update(num_experts=4, experts_per_token=2, moe_every=1, router='topk_softmax', moe_impl='dropless')
  return config
