"""The `crossrec` CLI's one-call commands: health, recommend, profile, delete-user, embed."""

from __future__ import annotations

import numpy as np

from clients.crossrec_client import CrossrecClient, CrossrecError, InvalidArgument
from tools.cli_output import EXIT_FAILED, EXIT_OK, cut, plain, print_json, table, utc

SERVICES = ("embedding", "fusion", "ranking")


def cmd_health(client: CrossrecClient, args) -> int:
    unknown = sorted(set(args.services) - set(SERVICES))
    if unknown:
        raise InvalidArgument("INVALID_ARGUMENT", f"unknown service(s) {', '.join(unknown)}; "
                                                  f"choose from {', '.join(SERVICES)}")
    report = {}
    for name in args.services or SERVICES:
        service = getattr(client, name)
        try:
            status = service.health()
        except CrossrecError as err:
            status = f"DOWN ({err})"
        report[name] = {"address": service.address, "status": status}
    if args.json:
        print_json(report)
    else:
        print(table([[n, r["address"], r["status"]] for n, r in report.items()],
                    ["service", "address", "status"]))
    return EXIT_OK if all(r["status"] == "SERVING" for r in report.values()) else EXIT_FAILED


def cmd_recommend(client: CrossrecClient, args) -> int:
    recs = client.ranking.recommend(args.user, args.platform, k=args.k,
                                    exclude_seen=args.exclude_seen, diversify=args.diversify)
    if args.json:
        print_json(recs)
        return EXIT_OK
    shares = ", ".join(f"{p} {w:.0%}" for p, w in sorted(recs.platform_weights.items()))
    print(f"user {args.user} on {args.platform}: {recs.source}"
          + (f" (platform shares: {shares})" if shares else ""))
    if recs.degraded:
        print(f"warning: degraded: {recs.degraded_reason}")
    rows = [[str(n), f"{r.score:.4f}", r.source, r.item_id, cut(r.title, 48), r.explanation]
            for n, r in enumerate(recs, 1)]
    print(table(rows, ["#", "score", "source", "item", "title", "explanation"], right={0, 1}))
    print("models: " + ", ".join(f"{m.name} v{m.version}" for m in recs.models))
    return EXIT_OK


def cmd_profile(client: CrossrecClient, args) -> int:
    profile = client.fusion.profile(args.user, args.for_platform, args.recent)
    if args.json:
        out = plain(profile)
        if not args.vectors:
            out.pop("fused_vector"), out.pop("for_platform_vector")
            for p in out["platforms"].values():
                p.pop("vector")
            for e in out["recent_events"]:
                e.pop("item_vector")
        print_json(out)
        return EXIT_OK
    if not profile.known:
        print(f"user {args.user} is unknown: no events on any platform")
        return EXIT_OK
    model = f"{profile.model.name} v{profile.model.version}"
    print(f"user {args.user}: {profile.total_events:,} events on {len(profile.platforms)} "
          f"platform(s); {profile.dim}-d vectors from {model}"
          + (" (untrained baseline)" if profile.baseline else ""))
    print(table([[p.platform, f"{p.event_count:,}", f"{p.fusion_weight:.1%}", utc(p.last_seen_ms)]
                 for p in profile.platforms.values()],
                ["platform", "events", "share", "last seen (UTC)"], right={1, 2}))
    if profile.for_platform:
        print(f"as seen by {profile.for_platform}: a {profile.dim}-d vector from all platforms")
    if profile.recent_events:
        print("recent events, newest first:")
        print(table([[utc(e.event.event_time_ms), e.event.platform, e.event.item_id,
                      e.event.action, cut(e.event.item_text, 70)]
                     for e in profile.recent_events],
                    ["time (UTC)", "platform", "item", "action", "item text"]))
    return EXIT_OK


def cmd_delete_user(client: CrossrecClient, args) -> int:
    deleted = client.fusion.delete_user(args.user)
    if args.json:
        print_json({"user_id": args.user, "deleted_events": deleted})
    else:
        print(f"deleted {deleted:,} events of user {args.user}")
    return EXIT_OK


def cmd_embed(client: CrossrecClient, args) -> int:
    vectors = client.embedding.embed(args.texts)
    if args.json:
        print_json({"dim": vectors.shape[1], "vectors": vectors})
        return EXIT_OK
    for text, v in zip(args.texts, vectors):
        head = " ".join(f"{x:+.4f}" for x in v[:6])
        print(f"{cut(text, 60)!r}: {v.shape[0]}-d [{head} ...] norm {np.linalg.norm(v):.4f}")
    return EXIT_OK
