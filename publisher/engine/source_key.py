"""One cache key for the source downloads of some manifests (the scheduled workflow caches them by it): it changes
with each source's commit and with the files a build downloads from it. Nothing is downloaded: one listing per repo."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from publisher.engine.community import community_plans
from publisher.engine.source import plan_source
from publisher.family import family_named
from publisher.manifest import LoadedManifest
from publisher.plan import FetchParams, build_plan


def sources_cache_key(manifests: Sequence[LoadedManifest], endpoint: str | None, token: str | bool | None,
                      namespace: str = "local") -> str:
    keys = []
    for item in manifests:
        manifest = item.manifest
        wanted = {c for target in manifest.publish for c in manifest.components_for(target)}
        components = family_named(manifest.family).ordered(c for c in wanted if not manifest.source_role(c))
        for fetch in build_plan([item], namespace).steps_of("fetch"):
            params = fetch.params
            assert isinstance(params, FetchParams)
            if params.community:  # a checkpoint file, its config repo, LoRAs
                keys += [plan.cache_key for plan in community_plans(params, components, endpoint, token)]
            elif params.role:  # an extra source (VAE, refiner)
                keys.append(plan_source(params.repo, params.revision, [], endpoint=endpoint, token=token,
                                        weights=params.weights, folders=params.folders).cache_key)
            else:
                keys.append(plan_source(params.repo, params.revision, components, endpoint=endpoint, token=token,
                                        weights=params.weights, family=params.family).cache_key)
    return keys[0] if len(keys) == 1 else hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]
