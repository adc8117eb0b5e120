require_relative "lib/tasker_core"
ActiveRecord::Base.establish_connection(ENV.fetch("DATABASE_URL", "postgres:///tasker_example"))

class Greet < TaskerCore::StepHandler
  def call(step) = { "text" => "#{config["greeting"]}, #{step.inputs["name"]}" }
end

class Shout < TaskerCore::StepHandler
  def call(step) = { "text" => step.parent_results["greet"]["text"].upcase }
end

TaskerCore.register_template("name" => "hello", "namespace_name" => "demo", "step_templates" => [
  { "name" => "greet", "handler_class" => "Greet", "handler_config" => { "greeting" => "Hello" } },
  { "name" => "shout", "handler_class" => "Shout", "depends_on_step" => "greet" }])
task_id = TaskerCore.create_task("demo", "hello", { "name" => "Ada" })

TaskerCore::Worker.new(namespaces: ["demo"]).run(stop_when: -> { TaskerCore.task_finished?(task_id) })
puts "task #{task_id} #{TaskerCore.task_status(task_id)}: #{TaskerCore.step_results(task_id)}"
