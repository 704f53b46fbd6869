"""The base of every error that is the user's to fix (bad input, missing files...).

The CLI prints these as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class SafeLLMError(ValueError):
    """Bad input: the message says what was wrong and what to do."""


def register_unique(registry: dict[str, type], kind: str, cls: type) -> type:
    """Put ``cls`` into ``registry`` under ``cls.name``; a second class of the same name is
    refused (it would silently replace the first). ``kind`` names the registry in the error."""
    taken = registry.get(cls.name, cls)
    if taken is not cls:
        raise SafeLLMError(
            f"two {kind} are named {cls.name!r} ({taken.__module__}.{taken.__qualname__} and "
            f"{cls.__module__}.{cls.__qualname__}); rename one"
        )
    registry[cls.name] = cls
    return cls
