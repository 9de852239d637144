"""Every key at its default. `jaxtune keys` prints each with its one-line help (the table lives in
jaxtune/config.py, next to the code it configures). Presets start from this and change values."""
from jaxtune.config import base_config


def get_config():
    return base_config()
