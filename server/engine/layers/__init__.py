"""Model building blocks shared by every family: norms, rotary embedding, dense MLP and MoE."""
