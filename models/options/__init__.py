"""Option declarations and everything derived from them: parsers, config files, recorded configs, key sets.

Importing this package imports no torch (every script's ``--help`` stays instant)."""
from models.options.catalog import (DEFAULT_GENERATOR, DEFAULT_VISION_ENCODER, SHARED, eval_options,  # noqa: F401
                                    plain_name_problem)
from models.options.parsing import (CONFIG, OptionsParser, build_parser, check_settings, checked_values,  # noqa: F401
                                    config_yaml, keys, parse, read_config, recorded, settings_from)
from models.options.settings import Settings, as_settings  # noqa: F401
from models.options.spec import Option, OptionError, by_name  # noqa: F401
