"""The paper's baselines and open questions, as variants of the model: exits that read through a norm and head of
their own (SFT+ICT, --separate_heads) or without the final norm (--no_exit_norm). Reached from the core through
load_llama.new_model, which builds the variant when a run or a checkpoint asks for it."""
