"""The decoder's templates, bounded. A collector must remember every template an exporter sends,
but anyone who can reach its port can send endless template ids, observation domains or source
addresses; so the cache holds at most `max_templates` templates and `max_fields` fields in all
and evicts the least recently defined or used one beyond that (counted in `evictions`). An evicted
template's data sets then count as "without template" until the exporter resends it, as after a
collector restart."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ipfix.record_parser import RecordParser

# (exporter address, observation domain / v9 source id / v5 engine, protocol): RFC 7011 §8.
Source = tuple[str, int, str]

DEFAULT_MAX_TEMPLATES = 4096
# About 400 bytes per field (parser, element) at worst: some 26 MB, and far above what real
# exporters send (tens of templates of tens of fields each).
DEFAULT_MAX_FIELDS = 65536
# One template fills at most a 65535-byte datagram with 4-byte field specifiers.
LARGEST_TEMPLATE_FIELDS = 65535 // 4


@dataclass(frozen=True)
class CachedTemplate:
    parser: RecordParser
    scope_count: int  # > 0 for an options template

    @property
    def field_count(self) -> int:
        return len(self.parser.fields)


class TemplateCache:
    def __init__(
        self, max_templates: int = DEFAULT_MAX_TEMPLATES, max_fields: int = DEFAULT_MAX_FIELDS
    ) -> None:
        if max_templates < 1 or max_fields < LARGEST_TEMPLATE_FIELDS:
            raise ValueError(
                f"template cache bounds {max_templates} templates, {max_fields} fields: need at "
                f"least 1 template and {LARGEST_TEMPLATE_FIELDS} fields (the largest template)"
            )
        self.max_templates = max_templates
        self.max_fields = max_fields
        self._entries: OrderedDict[tuple[Source, int], CachedTemplate] = OrderedDict()
        # Template ids per source, so withdrawing all of a source's templates costs what it holds.
        self._by_source: dict[Source, set[int]] = {}
        self.fields = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def sources(self) -> int:
        return len(self._by_source)

    def get(self, source: Source, template_id: int) -> CachedTemplate | None:
        key = (source, template_id)
        template = self._entries.get(key)
        if template is not None:
            self._entries.move_to_end(key)  # in use: the last to be evicted
        return template

    def put(self, source: Source, template_id: int, template: CachedTemplate) -> None:
        self.withdraw(source, template_id)
        self._entries[(source, template_id)] = template
        self._by_source.setdefault(source, set()).add(template_id)
        self.fields += template.field_count
        while len(self._entries) > self.max_templates or self.fields > self.max_fields:
            (old_source, old_id), _ = next(iter(self._entries.items()))
            self.withdraw(old_source, old_id)
            self.evictions += 1

    def withdraw(self, source: Source, template_id: int) -> None:
        template = self._entries.pop((source, template_id), None)
        if template is None:
            return
        self.fields -= template.field_count
        ids = self._by_source[source]
        ids.discard(template_id)
        if not ids:
            del self._by_source[source]

    def withdraw_all(self, source: Source, options: bool) -> None:
        """RFC 7011 §8.1: template id 2 (3) with no fields withdraws every (options) template."""
        for template_id in list(self._by_source.get(source, ())):
            if (self._entries[(source, template_id)].scope_count > 0) == options:
                self.withdraw(source, template_id)
