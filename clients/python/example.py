import psycopg
from tasker_worker import RetryableError, Worker

TEMPLATE = """{"name": "order", "namespace_name": "shop", "step_templates": [
  {"name": "quote_a", "handler_class": "Shop::Quote", "handler_config": {"unit_price": 3}},
  {"name": "quote_b", "handler_class": "Shop::Quote", "handler_config": {"unit_price": 2}},
  {"name": "order", "handler_class": "Shop::Order", "depends_on_steps": ["quote_a", "quote_b"]}]}"""
worker = Worker(namespaces=["shop"])  # connects with the PG* environment variables


@worker.handler("Shop::Quote")  # quote_a and quote_b run in parallel
def quote(step):
    if step.name == "quote_b" and step.attempt == 1:
        raise RetryableError("supplier busy", retry_after=1)  # retried 1 s later
    return {"price": step.inputs["qty"] * step.config["unit_price"]}


@worker.handler("Shop::Order")  # runs once both quotes are complete, with their results
def order(step):
    supplier = min(step.parent_results, key=lambda name: step.parent_results[name]["price"])
    print("ordering from", supplier, step.parent_results[supplier])
    return {"supplier": supplier}


db = psycopg.connect(autocommit=True)
db.execute("SELECT tasker_core.register_task_template(%s)", [TEMPLATE])
task = db.execute("""SELECT tasker_core.create_task('shop', 'order', NULL, '{"qty": 5}')""").fetchone()[0]
state = "SELECT status FROM tasker_core.get_task_execution_context(%s)"
worker.run(until=lambda: db.execute(state, [task]).fetchone()[0] in ("complete", "error"))  # or run()
