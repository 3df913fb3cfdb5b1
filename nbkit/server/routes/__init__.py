"""HTTP routes, one APIRouter per API: generate (original + TGI), openai (/v1), ops (health, info, metrics, page)."""
