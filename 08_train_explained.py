"""Train the cross-attention ("explained") captioner. See train.py for the options."""

import train

if __name__ == "__main__":
    train.main("explained")
