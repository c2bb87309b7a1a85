"""Train the self-attention-only captioner. See train.py for the options."""

import train

if __name__ == "__main__":
    train.main("self_attention")
