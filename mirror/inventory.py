"""What the cache holds, as operators name it: images by upstream, repository and tag
or digest; purging them; pinning them.

The index knows tags (-> digest), manifests by digest, blobs by digest, and pull
records and pins by image (`store.ImageKey`). What references what is read from the
manifests themselves: an index names its platform manifests, a manifest its config
and layers. So purging an image frees a blob only when no other cached manifest still
names it (Distribution #2367: a shared base layer expired under another image breaks
that image's pulls), and a pin protects everything its image reaches.

Everything here reads the whole index, which is what a lifecycle round does anyway:
fine at 100k entries from a worker thread, never on a request's path.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mirror.errors import RegistryError
from mirror.filespan import as_bytes
from mirror.manifests import descriptor_sizes
from mirror.manifests import references as required
from mirror.mediatypes import INDEX_TYPES
from mirror.reference import Digest, looks_like_digest
from mirror.referrers import CACHE_KEY as REFERRERS
from mirror.store import ImageKey, PullRecord, Store, StoredManifest, TagEntry, TagKey

# Config blobs read to name a single-platform image's platform: a few KiB each, and
# remembered (content by digest never changes).
CONFIG_MAX = 64 << 10
MAX_PLATFORMS_REMEMBERED = 65536


@dataclass(frozen=True, slots=True)
class Refs:
    """What one manifest names: child manifests (with their platform) and blobs."""

    manifests: tuple[tuple[Digest, str | None], ...]
    blobs: tuple[tuple[Digest, int], ...]
    config: Digest | None


def refs(stored: StoredManifest) -> Refs:
    """A manifest's references. Never its `subject` (a signature must not keep the
    image it signs), nor foreign layers (`urls`: never fetched through a mirror)."""
    try:
        document = json.loads(stored.body)
    except ValueError:
        return Refs((), (), None)
    if not isinstance(document, dict):
        return Refs((), (), None)
    children: list[tuple[Digest, str | None]] = []
    if stored.media_type in INDEX_TYPES or isinstance(document.get("manifests"), list):
        for entry in document.get("manifests") or []:
            if isinstance(entry, dict) and (d := _digest(entry.get("digest"))) is not None:
                children.append((d, _platform(entry.get("platform"))))
    # What the registry must hold with it, as the proxy checks a fetched manifest
    # (mirror.manifests), less the child manifests: its blobs.
    sizes = descriptor_sizes(document)
    named = required(document) - {d for d, _ in children}
    blobs = tuple(sorted(((d, sizes.get(d, 0)) for d in named), key=lambda b: str(b[0])))
    described = document.get("config")
    config = _digest(described.get("digest")) if isinstance(described, dict) else None
    return Refs(tuple(children), blobs, config if config in named else None)


def _digest(value: object) -> Digest | None:
    if not isinstance(value, str):
        return None
    try:
        return Digest.parse(value)
    except RegistryError:
        return None


def _platform(value: object) -> str | None:
    if not isinstance(value, dict):
        return None
    os_, arch = value.get("os"), value.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str):
        return None
    if os_ == "unknown":  # BuildKit's attestation manifests
        return None
    variant = value.get("variant")
    return f"{os_}/{arch}/{variant}" if isinstance(variant, str) and variant else f"{os_}/{arch}"


@dataclass(frozen=True, slots=True)
class Image:
    """One row of the listing: an image as clients pulled (or pinned) it."""

    key: ImageKey
    kind: str  # "tag" | "digest"
    digest: Digest
    media_type: str | None  # None: its manifest is no longer cached
    platforms: tuple[str, ...]
    size: int  # bytes of the blobs its manifests name
    cached_bytes: int  # of those, cached
    pulls: int
    last_pull: float | None
    pinned: bool
    stored_at: float | None  # a tag: when it was last confirmed with the upstream

    def as_json(self) -> dict[str, object]:
        return {
            "upstream": self.key.upstream,
            "repository": self.key.repo,
            "reference": self.key.ref,
            "kind": self.kind,
            "digest": str(self.digest),
            "media_type": self.media_type,
            "platforms": list(self.platforms),
            "size": self.size,
            "cached_bytes": self.cached_bytes,
            "pulls": self.pulls,
            "last_pull": self.last_pull,
            "pinned": self.pinned,
            "stored_at": self.stored_at,
        }


@dataclass(frozen=True, slots=True)
class Target:
    """What to purge: a whole upstream, a repository, a tag, or a digest (in one
    repository's names, or everywhere with upstream and repository left out)."""

    upstream: str | None
    repo: str | None = None
    tag: str | None = None
    digest: Digest | None = None

    def names(self, upstream: str, repo: str) -> bool:
        return (self.upstream is None or upstream == self.upstream) and (
            self.repo is None or repo == self.repo
        )

    def __str__(self) -> str:
        text = self.upstream or "*"
        if self.repo is not None:
            text += f"/{self.repo}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True, slots=True)
class Purged:
    tags: int
    manifests: int
    blobs: int
    bytes_freed: int
    blobs_kept: int  # the purged images' cached blobs another cached manifest still names
    pins: int
    # What went, for the events (not in the answer: a repository may free thousands).
    manifests_gone: tuple[Digest, ...] = ()
    blobs_freed: tuple[tuple[Digest, int], ...] = ()

    def as_json(self) -> dict[str, int]:
        return {
            "tags": self.tags,
            "manifests": self.manifests,
            "blobs": self.blobs,
            "bytes_freed": self.bytes_freed,
            "blobs_kept": self.blobs_kept,
            "pins": self.pins,
        }


@dataclass(frozen=True, slots=True)
class Protected:
    """What eviction must leave alone: everything pinned images reach, and the tag
    entries of pinned tags (or they would expire by `max_stale`)."""

    digests: frozenset[Digest] = frozenset()
    tags: frozenset[tuple[str, str, str]] = frozenset()  # (upstream, repo, tag)


@dataclass
class _Snapshot:
    """The index, read once: tags, pulls, pins, cached blob sizes and manifests."""

    tags: list[tuple[TagKey, TagEntry]]  # with referrers answers (purge drops those too)
    pulls: list[PullRecord]
    pins: dict[ImageKey, float]
    blobs: dict[Digest, int]
    manifests: set[Digest]
    docs: dict[Digest, StoredManifest | None] = field(default_factory=dict)

    @property
    def image_tags(self) -> list[tuple[TagKey, TagEntry]]:
        """Tags as clients name images: not the referrers answers kept as tags."""
        return [(k, e) for k, e in self.tags if k.accept != REFERRERS]


class Inventory:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._platforms: dict[Digest, str | None] = {}  # config digest -> platform
        # Parsed references by manifest digest (content by digest never changes): a
        # listing every few seconds (the status page) then parses nothing again.
        self._refs: dict[Digest, Refs] = {}
        # Recomputed before each eviction round (and on every pin change); read by the
        # round in its worker thread: a plain reference swap.
        self.protected = Protected()
        # Purges and pin changes one at a time: a purge reads, decides, then drops.
        self._writing = asyncio.Lock()
        # One listing at a time: status pages polling, or a client looping on the API,
        # never read the whole index in parallel.
        self._listing = asyncio.Lock()

    # -- reading ----------------------------------------------------------------------

    async def _snapshot(self) -> _Snapshot:
        def read() -> _Snapshot:
            store = self._store
            store.flush_access()  # this process's pulls, current
            scan = store.scan()
            return _Snapshot(
                store.tag_entries(),
                store.pulls(),
                store.pins(),
                {b.digest: b.size for b in scan.blobs},
                {d for d, _ in scan.manifests},
            )

        return await asyncio.to_thread(read)

    async def _manifest(self, snap: _Snapshot, digest: Digest) -> StoredManifest | None:
        if digest not in snap.docs:
            cached = digest in snap.manifests
            snap.docs[digest] = await self._store.get_manifest(digest) if cached else None
        return snap.docs[digest]

    async def _refs_of(self, snap: _Snapshot, digest: Digest) -> Refs | None:
        if digest not in snap.manifests:
            return None
        found = self._refs.get(digest)
        if found is None:
            stored = await self._manifest(snap, digest)
            if stored is None:
                return None
            found = refs(stored)
            if len(self._refs) >= MAX_PLATFORMS_REMEMBERED:
                self._refs.clear()
            self._refs[digest] = found
        return found

    async def _closure(
        self, snap: _Snapshot, roots: Iterable[Digest]
    ) -> tuple[set[Digest], dict[Digest, int]]:
        """The cached manifests reachable from `roots`, and the blobs they name."""
        seen: set[Digest] = set()
        blobs: dict[Digest, int] = {}
        todo = list(roots)
        while todo:
            digest = todo.pop()
            if digest in seen:
                continue
            seen.add(digest)
            found = await self._refs_of(snap, digest)
            if found is None:
                continue
            todo.extend(d for d, _ in found.manifests)
            blobs.update(found.blobs)
        return {d for d in seen if d in snap.manifests}, blobs

    async def _platforms_of(self, snap: _Snapshot, digest: Digest) -> tuple[str, ...]:
        found = await self._refs_of(snap, digest)
        if found is None:
            return ()
        if found.manifests:
            return tuple(sorted({p for _, p in found.manifests if p}))
        if found.config is None:
            return ()
        platform = await self._config_platform(found.config, dict(found.blobs)[found.config])
        return (platform,) if platform else ()

    async def _config_platform(self, config: Digest, size: int) -> str | None:
        if config in self._platforms:
            return self._platforms[config]
        platform = None
        blob = await self._store.open_blob(config) if 0 < size <= CONFIG_MAX else None
        if blob is None and 0 < size <= CONFIG_MAX:
            return None  # not cached yet (a pull in progress fetches it last): ask again
        if blob is not None:
            body = blob.body(0, None)
            try:
                data = b"".join([piece async for piece in as_bytes(body)])
            finally:
                await body.aclose()
            try:
                document = json.loads(data)
            except ValueError:
                document = None
            if isinstance(document, dict):
                platform = _platform(document)
        if len(self._platforms) >= MAX_PLATFORMS_REMEMBERED:
            self._platforms.clear()
        self._platforms[config] = platform
        return platform

    async def images(
        self, upstream: str | None = None, repo: str | None = None, query: str | None = None
    ) -> list[Image]:
        """Tags (newest answer per tag), digests pulled or pinned by digest (those a
        tag of the same repository already reaches are the tag's platform manifests,
        not images of their own), and pinned tags not cached (yet)."""
        async with self._listing:
            listed = await self._images()
        return [i for i in listed if _matches(i.key, upstream, repo, query)]

    async def _images(self) -> list[Image]:
        snap = await self._snapshot()
        pulls = {p.key: p for p in snap.pulls}
        rows: dict[ImageKey, tuple[Digest, str | None, float | None]] = {}
        for tag, entry in snap.image_tags:
            image = ImageKey(tag.upstream, tag.repo, tag.tag)
            old = rows.get(image)
            if old is None or (old[2] or 0) < entry.stored_at:
                rows[image] = (entry.digest, entry.media_type, entry.stored_at)
        reached: dict[tuple[str, str], set[Digest]] = {}
        for image, (digest, _, _) in rows.items():
            manifests, _ = await self._closure(snap, [digest])
            reached.setdefault((image.upstream, image.repo), set()).update(manifests | {digest})
        for key in [*pulls, *snap.pins]:
            if key in rows:
                continue
            if looks_like_digest(key.ref):
                digest = Digest.parse(key.ref)
                if digest in reached.get((key.upstream, key.repo), set()):
                    continue
                rows[key] = (digest, None, None)
            elif (record := pulls.get(key)) is not None:
                rows[key] = (record.digest, None, None)  # its tag entry expired
            else:
                rows[key] = (Digest.parse("sha256:" + "0" * 64), None, None)  # pinned, never pulled
        images = []
        for key, (digest, media_type, stored_at) in sorted(rows.items(), key=lambda r: str(r[0])):
            _, blobs = await self._closure(snap, [digest])
            stored = (
                None
                if media_type is not None and digest in snap.manifests
                else await self._manifest(snap, digest)
            )
            if stored is not None:
                media_type = stored.media_type
            elif digest not in snap.manifests:
                media_type = None  # its manifest is no longer cached
            record = pulls.get(key)
            images.append(
                Image(
                    key,
                    "digest" if looks_like_digest(key.ref) else "tag",
                    digest,
                    media_type,
                    await self._platforms_of(snap, digest),
                    sum(blobs.values()),
                    sum(size for d, size in blobs.items() if d in snap.blobs),
                    record.count if record else 0,
                    record.last if record else None,
                    key in snap.pins,
                    stored_at,
                )
            )
        return images

    # -- purging ----------------------------------------------------------------------

    async def purge(self, target: Target) -> Purged:
        async with self._writing:
            return await self._purge(target)

    async def _purge(self, target: Target) -> Purged:
        snap = await self._snapshot()
        # Tag entries go with their tag; a repository's or upstream's go whole, with
        # their referrers answers (kept under the digest they list).
        tags = [
            (k, e)
            for k, e in snap.tags
            if target.names(k.upstream, k.repo)
            and (target.tag is None or (k.tag == target.tag and k.accept != REFERRERS))
            and (target.digest is None or e.digest == target.digest)
        ]
        pulls = [
            p
            for p in snap.pulls
            if target.names(p.key.upstream, p.key.repo)
            and (target.tag is None or p.key.ref == target.tag)
            and (target.digest is None or p.digest == target.digest)
        ]
        pins = [
            k
            for k in snap.pins
            if target.names(k.upstream, k.repo)
            and (target.tag is None or k.ref == target.tag)
            and (target.digest is None or k.ref == str(target.digest))
        ]
        if target.digest is None and target.tag is not None and not (tags or pulls or pins):
            raise RegistryError(
                "MANIFEST_UNKNOWN", f"{target} is not cached", detail={"image": str(target)}
            )
        roots = {e.digest for k, e in tags if k.accept != REFERRERS} | {p.digest for p in pulls}
        forced: set[Digest] = set()
        if target.digest is not None:
            roots.add(target.digest)
            if target.repo is None:
                # Everywhere: the digest goes whatever names it. In one repository, only
                # that repository's names go, and what others reach stays.
                forced.add(target.digest)
        candidates, _ = await self._closure(snap, roots)
        dropped_tags = {k for k, _ in tags}
        dropped_pulls = {p.key for p in pulls}
        keep_roots = {e.digest for k, e in snap.tags if k not in dropped_tags}
        keep_roots |= {p.digest for p in snap.pulls if p.key not in dropped_pulls}
        keep_roots |= self.protected.digests
        keep_roots |= snap.manifests - candidates  # other cached manifests keep theirs
        keep_roots -= forced
        kept_manifests, kept_blobs = await self._closure(snap, keep_roots)
        gone = (candidates - kept_manifests) | (forced & snap.manifests)
        named: dict[Digest, int] = {}
        for digest in gone:
            stored = await self._manifest(snap, digest)
            if stored is not None:
                named.update(refs(stored).blobs)
        free = [d for d in named if d in snap.blobs and d not in kept_blobs]
        kept = sum(1 for d in named if d in snap.blobs and d in kept_blobs)
        if target.digest is not None and target.repo is None and target.digest in snap.blobs:
            free.append(target.digest)  # a blob named by digest goes whatever names it
        if target.digest is not None and not (gone or free or tags or pulls or pins):
            raise RegistryError(
                "MANIFEST_UNKNOWN", f"{target} is not cached", detail={"digest": str(target.digest)}
            )

        def drop() -> None:
            for store in _stores(self._store):
                store.drop_tags(sorted(dropped_tags, key=str))
                store.drop_manifests(sorted(gone, key=str))
                store.drop_blobs(sorted(set(free), key=str))
            self._store.drop_pulls(sorted(dropped_pulls, key=str))
            for key in pins:
                self._store.set_pin(key, None)

        await asyncio.to_thread(drop)
        if pins:
            await self._refresh_protected()
        return Purged(
            len(dropped_tags),
            len(gone),
            len(set(free)),
            sum(snap.blobs[d] for d in set(free)),
            kept,
            len(pins),
            tuple(sorted(gone, key=str)),
            tuple((d, snap.blobs[d]) for d in sorted(set(free), key=str)),
        )

    # -- pins -------------------------------------------------------------------------

    async def pins(self) -> dict[ImageKey, float]:
        return await asyncio.to_thread(self._store.pins)

    async def pin(self, key: ImageKey) -> None:
        async with self._writing:
            await asyncio.to_thread(self._store.set_pin, key, self._clock())
            await self._refresh_protected()

    async def unpin(self, key: ImageKey) -> bool:
        async with self._writing:
            pins = await asyncio.to_thread(self._store.pins)
            if key not in pins:
                return False
            await asyncio.to_thread(self._store.set_pin, key, None)
            await self._refresh_protected()
            return True

    async def refresh_protected(self) -> Protected:
        """Recompute what pins protect (before each eviction round: pins may have
        changed in another process, and pinned tags may have moved)."""
        async with self._writing:
            return await self._refresh_protected()

    async def _refresh_protected(self) -> Protected:
        if not await asyncio.to_thread(self._store.pins):
            self.protected = Protected()  # the common case: no second scan per round
            return self.protected
        snap = await self._snapshot()
        roots: set[Digest] = set()
        tags: set[tuple[str, str, str]] = set()
        for key in snap.pins:
            if looks_like_digest(key.ref):
                roots.add(Digest.parse(key.ref))
            else:
                tags.add((key.upstream, key.repo, key.ref))
        for tag, entry in snap.image_tags:
            if (tag.upstream, tag.repo, tag.tag) in tags:
                roots.add(entry.digest)
        manifests, blobs = await self._closure(snap, roots)
        self.protected = Protected(frozenset(manifests | roots | set(blobs)), frozenset(tags))
        return self.protected


def _stores(store: Store) -> list[Store]:
    """The store, and a shared store's local copy on this replica (purged content must
    not be served from it either; other replicas' copies go with their L1 eviction)."""
    l1 = getattr(store, "l1", None)
    return [store] if l1 is None else [store, l1]


def _matches(key: ImageKey, upstream: str | None, repo: str | None, query: str | None) -> bool:
    if upstream is not None and key.upstream != upstream:
        return False
    if repo is not None and key.repo != repo:
        return False
    if not query:
        return True
    text = str(key).lower()
    q = query.lower()
    return fnmatch.fnmatchcase(text, q) if any(c in q for c in "*?[") else q in text
