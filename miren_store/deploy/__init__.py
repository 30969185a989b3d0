"""The deploy domain: what a deploy, a preview label, a TTL and an app deletion mean, on top of
the entity store. Pure rules (labels, ttl, access) beside the operations that apply them
(deploys, cascade, apps) and the collector of expired previews (gc). Errors: errors.py."""
