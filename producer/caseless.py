"""Settings whose values are names from a fixed list read those names in any case.

People write `INFO`, `Info` or `info`, `sasl_ssl` or `SASL_SSL`; what is meant is never in doubt,
so `Annotated[LogLevel, CaseInsensitive()]` (an enum or a `Literal` of strings) turns a string
that matches a choice but for case into that choice. Anything else is validated as before,
so an unknown name is still refused with the list of choices.
"""

from enum import Enum
from typing import Any, get_args

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema


class CaseInsensitive:
    """Annotated marker: a string equal to one of the type's choices but for case is that one."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        choices = [member.value for member in source] if _is_enum(source) else get_args(source)
        by_folded = {choice.casefold(): choice for choice in choices}

        def fold(value: Any) -> Any:
            return by_folded.get(value.casefold(), value) if isinstance(value, str) else value

        return core_schema.no_info_before_validator_function(fold, handler(source))


def _is_enum(source: Any) -> bool:
    return isinstance(source, type) and issubclass(source, Enum)
