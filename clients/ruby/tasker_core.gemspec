Gem::Specification.new do |s|
  s.name = "tasker_core"
  s.version = File.read(File.join(__dir__, "lib/tasker_core.rb"))[/VERSION = "([^"]+)"/, 1]
  s.summary = "A Ruby worker for tasker_core, the PostgreSQL extension that runs Tasker workflows in SQL"
  s.authors = ["tasker_core"]
  s.license = "MIT"
  s.files = Dir["lib/**/*.rb"] + ["README.md"]
  s.required_ruby_version = ">= 3.0"
  s.add_dependency "activerecord", ">= 6.1"
  s.add_dependency "pg", ">= 1.1"
end
