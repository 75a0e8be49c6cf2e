import { render } from 'preact';
import 'highlight.js/styles/github.css';
import './style.css';
import { App } from './App.jsx';

render(<App />, document.getElementById('app'));
